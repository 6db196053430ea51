"""Deepfake detection in plain torch / numpy (no Ray): backbones, augmentations, the training mixture, momentum
difficulty boosting, checkpoints, metrics and the evaluation matrix. The Ray glue is in ray_jobs/train_detector.py
and ray_jobs/evaluate_detector.py."""
