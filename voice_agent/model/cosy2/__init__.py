"""CosyVoice2's decoder: flow matching, HiFT, speaker voices, the cosy2_decoder directory."""
