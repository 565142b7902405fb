"""Experiments built on the library: the reproduction presets and the noise ablation
(``msn reproduce``). The library core (noise, data, train, decoding, bench) never imports
from here."""
