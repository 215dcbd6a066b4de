"""One engine for every script: trainer, validator and predictor share the model loader, preprocessing and NMS."""
