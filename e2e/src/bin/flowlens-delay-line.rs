//! A delay line: a TUN device whose every packet is held for a fixed time and
//! then handed back to the kernel. With policy routing sending traffic between
//! two networks through the device (see `flowlens_e2e::delay`), it adds a
//! known one-way delay, which is how the tests inject latency without netem.
//!
//! Usage: `flowlens-delay-line --dev dl0 --delay-us 10000`
//! (run inside the network namespace that routes through it).

use std::{
    collections::VecDeque,
    fs::File,
    io::{Read, Write},
    os::fd::{AsRawFd, FromRawFd},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x400454ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_tun(name: &str) -> std::io::Result<File> {
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let file = unsafe { File::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    let n = name.len().min(15);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let dev = get("--dev").unwrap_or_else(|| "dl0".into());
    let delay = Duration::from_micros(
        get("--delay-us")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000),
    );
    let tun = open_tun(&dev).unwrap_or_else(|e| {
        eprintln!("flowlens-delay-line: cannot create TUN device {dev}: {e}");
        std::process::exit(1);
    });
    let mut writer = tun.try_clone().expect("dup TUN fd");
    type Queue = (Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar);
    let queue: Arc<Queue> = Arc::default();

    let q = queue.clone();
    std::thread::spawn(move || {
        let (lock, cv) = &*q;
        loop {
            let (due, pkt) = {
                let mut g = lock.lock().unwrap();
                while g.is_empty() {
                    g = cv.wait(g).unwrap();
                }
                g.pop_front().unwrap()
            };
            // Constant delay: FIFO order is due order. Sleep most of the way,
            // then spin for sub-millisecond precision.
            loop {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                let left = due - now;
                if left > Duration::from_micros(200) {
                    std::thread::sleep(left - Duration::from_micros(150));
                } else {
                    std::hint::spin_loop();
                }
            }
            let _ = writer.write(&pkt);
        }
    });
    eprintln!("flowlens-delay-line: {dev} holds every packet for {delay:?}");
    let mut reader = tun;
    let mut buf = vec![0u8; 65536];
    let (lock, cv) = &*queue;
    loop {
        match reader.read(&mut buf) {
            Ok(n) if n > 0 => {
                lock.lock()
                    .unwrap()
                    .push_back((Instant::now() + delay, buf[..n].to_vec()));
                cv.notify_one();
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("flowlens-delay-line: read: {e}");
                std::process::exit(1);
            }
        }
    }
}
