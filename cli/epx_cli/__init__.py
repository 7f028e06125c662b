"""The epx command line (click + rich). No science in here: it renders what ep_core computes."""
