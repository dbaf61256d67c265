"""txt2img: samplers, seeds, the denoising loop, infotext, and saving images."""
