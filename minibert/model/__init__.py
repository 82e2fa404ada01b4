"""The model room: the BERT encoder with its MLM and NSP heads (bert), the losses (loss), the autograd
ops (ops) and the fused C++ CPU kernels they call (kernels/)."""
