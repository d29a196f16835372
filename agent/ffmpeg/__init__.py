"""FFmpeg on the agent: discovery, scenario argv, progress parsing, byte counting."""
