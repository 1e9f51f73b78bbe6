"""Which epoch is the character? Every saved epoch scored for likeness, prompt fidelity and variety.

Reading order: :mod:`.models` (which scoring models, where they come from, getting their files),
:mod:`.embedders` (images to L2-normalised embeddings: faces with ArcFace, drawn characters with CCIP),
:mod:`.clip_scorer` (CLIP text-image similarity), :mod:`.metrics` (the maths of each score),
:mod:`.prompts` (the evaluation prompt set), :mod:`.validation` (a deterministic validation loss the
training loop calls at each epoch end), :mod:`.verdict` (which epoch, which weight) and
:mod:`.scoring` (render every epoch through the host's renderer, score it, write the results).
"""
