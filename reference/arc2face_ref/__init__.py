"""PyTorch reference for Arc2Face: the models, a reference pipeline and random-weight checkpoints.

The oracle for every parity test; the runtime (arc2face_rt) never imports it.
"""
