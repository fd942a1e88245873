//! Samplers (DDPM, DDIM, DPM-Solver++, Heun) and evaluation binaries
