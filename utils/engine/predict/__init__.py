"""Prediction on images, folders, videos and streams: the predictor and box drawing."""
