"""Measuring samples: sliced Wasserstein and mixture metrics for points (``metrics``), FID / KID /
precision-recall for images (``image_metrics``) with their feature networks (``features``), and how straight a
model's trajectories are (``straightness``, for reflow)."""
