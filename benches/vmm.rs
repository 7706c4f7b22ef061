//! `cargo bench --bench vmm`: the VMM's own cost with the tiny PVH guest
//! (a few dozen bytes that print a line and reset through the i8042):
//! VM setup, run to reset, and teardown, each as median/min/max over 30 runs.

use std::time::Instant;

use vmc::bench::{tiny_guest, Summary};
use vmc::vmm::{self, Backend, DeviceConfig, VmConfig, VmExit};

fn main() {
    let kernel = std::env::temp_dir().join(format!("vmc-bench-tiny-{}.elf", std::process::id()));
    std::fs::write(&kernel, tiny_guest::elf(b"ready\n", true)).expect("write tiny guest");
    let (mut setup, mut run, mut teardown) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=30 {
        let t0 = Instant::now();
        let vm = vmm::start(
            VmConfig::new(&kernel, 1, 128 << 20)
                .with_device(DeviceConfig::Rng)
                .with_console(Box::new(std::io::sink())),
        )
        .expect("start the tiny guest");
        let t1 = t0.elapsed();
        while vm.is_running() {
            std::hint::spin_loop();
        }
        let t2 = t0.elapsed();
        assert_eq!(vm.wait(), VmExit::Reset);
        let t3 = t0.elapsed();
        if i > 0 {
            setup.push(t1.as_secs_f64() * 1e3);
            run.push((t2 - t1).as_secs_f64() * 1e3);
            teardown.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let _ = std::fs::remove_file(&kernel);
    println!("backend: {}", Backend::host());
    for (metric, samples) in [
        ("setup (KVM VM, memory, devices, vCPU)", &setup),
        ("run to i8042 reset", &run),
        ("teardown (vCPU join, KVM VM destroy)", &teardown),
    ] {
        let s = Summary::of(samples);
        println!(
            "{:<45} n={:<3} median {:>7.2} ms  min {:>7.2}  max {:>7.2}",
            metric, s.n, s.median, s.min, s.max
        );
    }
}
