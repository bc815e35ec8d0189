"""What tests, benchmarks and notebooks use to run Ray clusters on this machine; not part of the product.

Several clusters share one machine here (the test session's, a launcher a test
starts, three benchmark servers side by side, a notebook's own), so each one
stays on loopback and takes a private block of Serve's ports
(`cluster_ports`), and the harnesses deploy and inspect the app through
Serve's REST API, as `serve deploy` does (`serve_rest`).

It is not installed (pyproject.toml's package list leaves it out): it is
imported from a checkout, with the repository root on sys.path: pytest and
`python -m benchmarks.x` run from the root; notebooks/app_session.py puts the
root on sys.path for the notebook kernels.
"""
