"""grit_models: a minimal Mistral/Mixtral and GritModel on top of grit_kernels."""
