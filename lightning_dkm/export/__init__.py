"""The finalized model leaving training: the safetensors artifact (:mod:`.artifact`), packed
inference (:mod:`.packed`), Core ML (:mod:`.coreml`), the compression report and its energy
estimate (:mod:`.report`, :mod:`.energy`) and the atomic file writer they share
(:mod:`.files`). Uses the engine and the model layer; no Lightning.
"""
