//! Which image of a fatbin a GPU can run, by the CUDA compatibility rules. The driver makes the real choice
//! when it loads the fatbin; this mirrors it so an error can say what the fatbin holds and why nothing fits.

/// One image of a fatbin: machine code for `sm_XY` or PTX for `compute_XY` (capability `XY` as `10*X+Y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    Sm(u32),
    Ptx(u32),
}

impl Image {
    /// Whether a GPU of compute capability `major.minor` can run this image: machine code for `X.Y` runs
    /// on `X.Z` with `Z >= Y` (same major only); PTX for `X.Y` is compiled by the driver for any
    /// capability `>= X.Y`.
    pub fn runs_on(self, major: u32, minor: u32) -> bool {
        let cc = 10 * major + minor;
        match self {
            Image::Sm(c) => c / 10 == major && c <= cc,
            Image::Ptx(c) => c <= cc,
        }
    }
}

impl std::fmt::Display for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::Sm(c) => write!(f, "sm_{c}"),
            Image::Ptx(c) => write!(f, "compute_{c} (PTX)"),
        }
    }
}

/// The image the driver loads for `major.minor`: the newest fitting machine code, else the newest fitting
/// PTX (compiled at load time), else none.
pub fn select(images: &[Image], major: u32, minor: u32) -> Option<Image> {
    let fits = |want_sm: bool| {
        images
            .iter()
            .copied()
            .filter(|i| matches!(i, Image::Sm(_)) == want_sm && i.runs_on(major, minor))
            .max_by_key(|i| match i {
                Image::Sm(c) | Image::Ptx(c) => *c,
            })
    };
    fits(true).or_else(|| fits(false))
}

/// Parses build.rs's lists (`sm_80,sm_86`, `compute_90`; either may be empty).
pub fn parse(sm: &str, ptx: &str) -> Vec<Image> {
    let num = |s: &str, p: &str| s.trim().strip_prefix(p).and_then(|n| n.parse::<u32>().ok());
    sm.split(',')
        .filter_map(|s| num(s, "sm_").map(Image::Sm))
        .chain(
            ptx.split(',')
                .filter_map(|s| num(s, "compute_").map(Image::Ptx)),
        )
        .collect()
}

/// The sentence an error gives when a GPU of `major.minor` (named `gpu`) finds no image in `images`.
pub fn no_image_message(gpu: &str, major: u32, minor: u32, images: &[Image]) -> String {
    let list = images
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "the GPU {gpu} has compute capability {major}.{minor}, and the ddpm-kernels fatbin holds no image \
         it can run (it holds {list}); rebuild with DDPM_CUDA_SM={major}{minor} (crates/kernels/build.rs)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_images() -> Vec<Image> {
        parse("sm_80,sm_86,sm_89,sm_90", "compute_90")
    }

    #[test]
    fn each_gpu_gets_its_image() {
        let im = default_images();
        // (GPU, capability, expected image)
        let table = [
            ("A100", (8, 0), Some(Image::Sm(80))),
            ("A10 / RTX 3090", (8, 6), Some(Image::Sm(86))),
            ("Jetson Orin", (8, 7), Some(Image::Sm(86))),
            ("L4 / RTX 4090", (8, 9), Some(Image::Sm(89))),
            ("H100 / H200", (9, 0), Some(Image::Sm(90))),
            ("B200", (10, 0), Some(Image::Ptx(90))),
            ("RTX 5090", (12, 0), Some(Image::Ptx(90))),
            ("T4", (7, 5), None),
            ("V100", (7, 0), None),
        ];
        for (gpu, (ma, mi), want) in table {
            assert_eq!(select(&im, ma, mi), want, "{gpu} ({ma}.{mi})");
        }
    }

    #[test]
    fn machine_code_never_crosses_a_major_version() {
        assert!(!Image::Sm(90).runs_on(10, 0));
        assert!(!Image::Sm(86).runs_on(9, 0));
        assert!(!Image::Sm(89).runs_on(8, 6));
        assert!(Image::Sm(80).runs_on(8, 9));
        assert!(Image::Ptx(80).runs_on(12, 1));
        assert!(!Image::Ptx(90).runs_on(8, 9));
        // Newest PTX would have left a B200 with nothing: the reason build.rs embeds compute_90.
        assert_eq!(select(&parse("sm_90", "compute_120"), 10, 0), None);
    }

    #[test]
    fn parse_reads_build_rs_lists() {
        assert_eq!(
            parse("sm_80,sm_90", "compute_90"),
            vec![Image::Sm(80), Image::Sm(90), Image::Ptx(90)]
        );
        assert_eq!(parse("", "compute_90"), vec![Image::Ptx(90)]);
        assert_eq!(parse("sm_90", ""), vec![Image::Sm(90)]);
    }

    #[test]
    fn message_names_the_capability_and_the_images() {
        let m = no_image_message("Tesla T4", 7, 5, &default_images());
        assert!(m.contains("compute capability 7.5"), "{m}");
        assert!(m.contains("Tesla T4"), "{m}");
        assert!(
            m.contains("sm_80, sm_86, sm_89, sm_90, compute_90 (PTX)"),
            "{m}"
        );
        assert!(m.contains("DDPM_CUDA_SM=75"), "{m}");
    }
}
