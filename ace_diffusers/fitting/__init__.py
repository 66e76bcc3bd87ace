"""How an erasure is found. Prompts (:mod:`.presets`) become token embeddings (:mod:`.text`, cached by
:mod:`.embedding_cache`), laid out as fit data (:mod:`.data`), solved in closed form (:mod:`.solvers`,
:mod:`.closed_form`) and hardened by fine-tuning (:mod:`.trainer` with :mod:`.attention` and
:mod:`.mining`). Each fitter yields a frozen :class:`~ace_diffusers.core.adapter.ACEAdapter`."""
