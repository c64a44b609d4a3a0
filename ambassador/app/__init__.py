"""Twistd ambassador: options, config file, discovery, makeService, workers."""
