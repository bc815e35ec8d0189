"""The generated stubs in policy_wire/ match proto/robot_inference.proto exactly."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = ["__init__.py", "robot_inference_pb2.py", "robot_inference_pb2.pyi", "robot_inference_pb2_grpc.py"]


def test_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True)
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "policy_wire" / name).read_bytes() != (REPO / "policy_wire" / name).read_bytes()
    ]
    assert not stale, f"policy_wire/{stale} are stale: run `python proto/generate.py` and commit"


def test_opentau_fields_keep_their_numbers():
    """Fields 1-7 are OpenTau's wire; ours start at 100."""
    from policy_wire import robot_inference_pb2 as pb

    expected = {
        "CameraImage": {"image_data": 1, "encoding": 2},
        "RobotState": {"state": 1},
        "ObservationRequest": {
            "images": 1, "robot_state": 2, "prompt": 3, "prefix_action": 4, "delay": 5, "timestamp_ns": 6, "request_id": 7,
        },
        "ActionVector": {"values": 1},
        "ActionChunkResponse": {"action_chunk": 1, "timestamp_ns": 2, "request_id": 3, "inference_time_ms": 4, "accel": 5},
        "HealthCheckResponse": {
            "healthy": 1, "status": 2, "model_name": 3, "device": 4, "gpu_memory_used_gb": 5, "gpu_memory_total_gb": 6,
        },
    }
    for message, fields in expected.items():
        descriptor = getattr(pb, message).DESCRIPTOR
        for field in descriptor.fields:
            if field.name in fields:
                assert field.number == fields[field.name], (message, field.name)
            else:
                assert field.number >= 100, f"{message}.{field.name} is an extension numbered below 100"
        assert set(fields) <= {f.name for f in descriptor.fields}, message
    assert pb.ActionChunkResponse.DESCRIPTOR.fields_by_name["accel"].has_presence
    service = pb.DESCRIPTOR.services_by_name["RobotPolicyService"]
    assert service.full_name == "robot_inference.RobotPolicyService"
    assert {m.name for m in service.methods} == {"GetActionChunk", "StreamActionChunks", "HealthCheck"}
