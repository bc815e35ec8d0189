"""Ray Serve application that serves robot policies over OpenTau's gRPC wire.

Kept import-free: training and benchmark scripts import the observation code
without pulling in Ray. The Serve entry point is `serve_app.app:build_app`.
"""
