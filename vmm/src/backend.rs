//! Which virtualisation backend sits behind /dev/kvm, and what a guest needs
//! on it.
//!
//! On hardware virtualisation (Intel VMX, AMD SVM) a stock kernel runs as is.
//! Under the `kvm_pvm` module in native mode (software virtualisation, see
//! HOST-KVM.md in the project's shared notes) the guest kernel needs a few
//! command-line flags and vmc's kernel patch, switched on by `vmc.pvm`.

use std::fmt;
use std::fs;

/// The backend found on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    /// kvm_pvm with `pvm_native=Y`: privileged guest instructions are emulated.
    PvmNative,
    /// kvm_pvm in its paravirtual mode (needs a PVM-enabled guest kernel).
    Pvm,
    /// /dev/kvm exists but the CPU flags name no known backend (e.g. nested
    /// virtualisation that hides vmx/svm).
    Unknown,
}

impl Backend {
    /// This host's backend, detected once per process.
    pub fn host() -> Backend {
        static HOST: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        *HOST.get_or_init(Backend::detect)
    }

    /// Detects the backend from /sys/module and /proc/cpuinfo.
    fn detect() -> Backend {
        Self::from_probe(
            fs::read_to_string("/sys/module/kvm_pvm/parameters/pvm_native").ok(),
            fs::metadata("/sys/module/kvm_pvm").is_ok(),
            &fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
        )
    }

    fn from_probe(pvm_native: Option<String>, pvm_loaded: bool, cpuinfo: &str) -> Backend {
        if let Some(v) = pvm_native {
            if v.trim() == "Y" || v.trim() == "1" {
                return Backend::PvmNative;
            }
        }
        if pvm_loaded {
            return Backend::Pvm;
        }
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        if has("vmx") {
            Backend::Vmx
        } else if has("svm") {
            Backend::Svm
        } else {
            Backend::Unknown
        }
    }

    /// Whether the guest needs vmc's kvm_pvm workarounds.
    pub fn needs_pvm_quirks(self) -> bool {
        self == Backend::PvmNative
    }

    /// Kernel command-line flags this backend needs (empty on hardware).
    ///
    /// Besides the kernel flags, under pvm_native guest user code runs with
    /// the host's XCR0 and so uses AVX, but the guest kernel (noxsave, as
    /// XRSTOR cannot be emulated) switches tasks with FXSAVE, which loses the
    /// YMM high halves: glibc programs are told not to use AVX through
    /// `GLIBC_TUNABLES`, which the kernel passes to the agent's environment
    /// and the agent to every process it starts.
    ///
    /// Under pvm_native the emulator cannot run the XRSTOR of FPU setup
    /// (`noxsave`; the kernel reads it early and also reports it as unknown),
    /// CMPXCHG16B (SLUB's double-word cmpxchg), POPCNT and CLAC/STAC (SMAP)
    /// in the kernel; RDRAND/RDSEED, FSGSBASE and PCID/INVPCID are off as a
    /// precaution. ERMS and FSRM (297, 580) are hidden for speed: the
    /// emulator takes one step per byte of a `rep movsb/stosb`, so the
    /// kernel's word-wise copies make page faults and copies to user space
    /// several times cheaper. (Clearing them in the CPUID vmc hands KVM did
    /// not hide them from the guest kernel on this backend; clearcpuid does.) `vmc.pvm` enables the kernel patch in kernels/patches/.
    /// `cgroup_disable=memory`: the guest mounts no cgroup filesystem (the
    /// VM is the container's memory limit), and memory-cgroup accounting
    /// of every page the guest kernel maps and frees was ~8 % of its
    /// emulated work in a run here.
    pub fn guest_cmdline(self) -> &'static str {
        if self.needs_pvm_quirks() {
            "vmc.pvm noxsave clearcpuid=141,151,158,297,306,308,580 nofsgsbase nopcid noinvpcid \
             cgroup_disable=memory \
             GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX_Fast_Unaligned_Load,-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"
        } else {
            ""
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Vmx => "hardware (Intel VT-x)",
            Backend::Svm => "hardware (AMD-V)",
            Backend::PvmNative => "kvm_pvm native mode (software virtualisation)",
            Backend::Pvm => "kvm_pvm (paravirtual mode)",
            Backend::Unknown => "unknown (no vmx/svm flag; nested or hidden)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_native_wins_over_cpu_flags() {
        let b = Backend::from_probe(Some("Y\n".into()), true, "flags : fpu svm");
        assert_eq!(b, Backend::PvmNative);
        assert!(b.needs_pvm_quirks());
        assert!(b.guest_cmdline().contains("vmc.pvm"));
    }

    /// Every flag the README lists for kvm_pvm's native mode, as whole words
    /// of the command line, and glibc told not to use AVX.
    #[test]
    fn pvm_native_gets_every_flag_the_readme_lists() {
        let line = Backend::PvmNative.guest_cmdline();
        let words: Vec<&str> = line.split_whitespace().collect();
        for flag in [
            "vmc.pvm",
            "noxsave",
            "clearcpuid=141,151,158,297,306,308,580",
            "nofsgsbase",
            "nopcid",
            "noinvpcid",
            "cgroup_disable=memory",
        ] {
            assert!(words.contains(&flag), "{flag} missing from {line:?}");
        }
        let tunables = words
            .iter()
            .find_map(|w| w.strip_prefix("GLIBC_TUNABLES=glibc.cpu.hwcaps="))
            .unwrap_or_else(|| panic!("no GLIBC_TUNABLES in {line:?}"));
        let hwcaps: Vec<&str> = tunables.split(',').collect();
        for cap in ["-AVX", "-AVX2", "-AVX512F"] {
            assert!(hwcaps.contains(&cap), "{cap} missing from {tunables}");
        }
        // The VM's command line carries them all, after vmc's own.
        let full = crate::base_cmdline(false, Backend::PvmNative);
        for w in &words {
            assert!(full.iter().any(|f| f == w), "{w} missing from {full:?}");
        }
        for other in [Backend::Vmx, Backend::Svm, Backend::Pvm, Backend::Unknown] {
            assert_eq!(other.guest_cmdline(), "", "{other:?}");
            assert!(!crate::base_cmdline(false, other)
                .iter()
                .any(|w| w == "vmc.pvm" || w == "noxsave"));
        }
    }

    #[test]
    fn hardware_backends_need_no_quirks() {
        let vmx = Backend::from_probe(None, false, "processor: 0\nflags\t\t: fpu vmx sse\n");
        assert_eq!(vmx, Backend::Vmx);
        assert_eq!(vmx.guest_cmdline(), "");
        assert_eq!(
            Backend::from_probe(None, false, "flags : fpu svm"),
            Backend::Svm
        );
        assert_eq!(
            Backend::from_probe(None, false, "flags : fpu sse"),
            Backend::Unknown
        );
        assert_eq!(
            Backend::from_probe(Some("N".into()), true, "flags : fpu"),
            Backend::Pvm
        );
    }
}
