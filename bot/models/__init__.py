"""Model builds: preparing the embedded quantized models, listing profiles, evaluating quality."""
