"""Generated from proto/robot_inference.proto by proto/generate.py. Do not edit."""
