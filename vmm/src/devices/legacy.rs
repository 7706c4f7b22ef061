//! Legacy PC devices, from vm-superio: the 8250 UART on COM1 (kernel console,
//! only with `--debug`) and the i8042 controller, whose reset line is how the
//! guest ends the VM (`reboot=k`).

use std::io::{self, Write};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// An eventfd as a vm-superio interrupt or reset line.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 on the port bus; output goes to `out`.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing the guest's output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A console write error is not the guest's problem; drop the byte.
            let _ = self.serial.write(offset as u8, data[0]);
        }
    }
}

/// The i8042 at ports 0x60-0x64; a CPU reset command signals `reset`.
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    pub fn new(reset: EventFd) -> Self {
        I8042 {
            dev: I8042Device::new(EventFdTrigger(reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.dev.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_transmits_bytes_written_to_thr() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq, Box::new(sink.clone()));
        for b in b"ok\n" {
            s.write(0, &[*b]);
        }
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit set");
        assert_eq!(&*sink.0.lock().unwrap(), b"ok\n");
    }

    #[test]
    fn i8042_reset_command_fires_the_reset_line() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut kbd = I8042::new(reset.try_clone().unwrap());
        assert!(reset.read().is_err(), "no reset yet");
        kbd.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
