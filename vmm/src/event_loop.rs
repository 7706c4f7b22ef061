//! The VMM's event loop thread: queue notifications (ioeventfds), device
//! backend descriptors (vsock host sockets) and the exit eventfd, all on one
//! epoll set. The vCPU threads never process queues.

use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{Token, VirtioDevice};

/// A device and its queue eventfds, as the loop sees them.
pub struct LoopDevice {
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub queue_evts: Vec<EventFd>,
}

/// Runs until the exit eventfd fires.
pub fn run(epoll: Arc<Epoll>, devices: Vec<LoopDevice>) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("vmm event loop: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match Token::decode(ev.data()) {
                Some(Token::Exit) => return,
                Some(Token::Queue { dev, queue }) => {
                    let Some(d) = devices.get(dev as usize) else {
                        continue;
                    };
                    if let Some(evt) = d.queue_evts.get(queue as usize) {
                        let _ = evt.read();
                    }
                    d.device
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .queue_notify(queue as usize);
                }
                Some(Token::Device { dev, sub }) => {
                    if let Some(d) = devices.get(dev as usize) {
                        d.device
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .backend_event(sub, ev.event_set());
                    }
                }
                None => log::warn!("vmm event loop: unknown token {:#x}", ev.data()),
            }
        }
    }
}
