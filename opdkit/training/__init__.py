"""The training engine every method shares: one loop (:mod:`.loop`), the objectives as pure tensor
functions (:mod:`.losses`), on-policy rollouts (:mod:`.rollout`), trainable parameters and EMA
(:mod:`.trainable`), weighted rewards (:mod:`.rewards`), OPD's teachers (:mod:`.teachers`) and
what GRPO and OPD share beyond that (:mod:`.onpolicy`)."""
