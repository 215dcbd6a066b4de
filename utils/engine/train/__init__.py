"""Training: the trainer and its phases, optimizer/EMA, autobatch, TensorBoard logging, --evolve search."""
