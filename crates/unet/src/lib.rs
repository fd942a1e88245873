//! The DDPM U-Net in candle
