"""What is applied: the adapter as data (:mod:`.adapter`), the math of one layer's gated low-rank K/V edit
(:mod:`.factors`) and the attention processors that run it (:mod:`.processor`)."""
