"""How an adapter meets a diffusers model: finding the UNet and its attention modules (:mod:`.modules`),
attaching and detaching adapters (:mod:`.attach`) and guarding the processors against diffusers calls
that would replace them (:mod:`.compat`)."""
