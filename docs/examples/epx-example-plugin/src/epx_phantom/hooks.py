"""The plugin epx finds through the entry point: it registers the estimator by reference ("module:Class"), so
that `epx list` and `epx --help` show it without importing it, or torch; epx imports it on first use."""

from ep_core import registers

phantom = registers("estimator", "phantom", "epx_phantom.plugin:Phantom",
                    summary="phantom gradient: backprop through k damped steps of G from x*")
