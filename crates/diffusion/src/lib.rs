//! Diffusion mathematics: schedules, forward process, posteriors, losses, ELBO terms
