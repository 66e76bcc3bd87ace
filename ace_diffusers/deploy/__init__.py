"""How an erasure leaves the plugin: baked into a plain weight edit (:mod:`.bake`, measured by
:mod:`.fidelity`), fused into the UNet's weights (:mod:`.fuse`) or exported as a LoRA file
(:mod:`.export`)."""
