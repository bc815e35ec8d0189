"""pi05: OpenTau's PaliGemma + flow-matching action expert VLA, served natively.

Plain PyTorch with OpenTau's parameter names, so OpenTau checkpoints load with
strict key and shape matching and no remapping. See docs/pi05.md.
"""

from serve_app.policies.pi05.configuration import Pi05Config
from serve_app.policies.pi05.policy import PREPROCESSING, Pi05Network, Pi05Policy, expected_weights, load

__all__ = ["PREPROCESSING", "Pi05Config", "Pi05Network", "Pi05Policy", "expected_weights", "load"]
