"""The wire. robot_inference_pb2*.py and this file are generated from proto/robot_inference.proto by
proto/generate.py: never edit them. input_spec.py is written by hand: the input spec both sides read."""
