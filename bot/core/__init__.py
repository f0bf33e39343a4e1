"""Platform-neutral core: chat service, generation queue, prompt building."""
