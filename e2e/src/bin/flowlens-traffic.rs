//! Traffic tools for the tests, run inside pod network namespaces. Every
//! client prints one JSON line with what it measured.
//!
//! ```text
//! flowlens-traffic echo-server --port P
//! flowlens-traffic ping-pong --to IP:PORT [--count N] [--interval-ms M] [--size S] [--hold-ms H]
//! flowlens-traffic connect-loop --to IP:PORT [--interval-ms 10] [--duration-ms D] [--timeout-ms T]
//! flowlens-traffic stream --to IP:PORT [--duration-ms D] [--chunk S] [--interval-ms M]
//! flowlens-traffic idle-exchange --to IP:PORT --idle-ms I [--timeout-ms T]
//! ```

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

fn arg<T: std::str::FromStr>(args: &[String], flag: &str, default: T) -> T {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn target(args: &[String]) -> SocketAddr {
    let to: String = arg(args, "--to", String::new());
    to.parse().unwrap_or_else(|_| {
        eprintln!("--to IP:PORT is required (IPv6 as [addr]:port)");
        std::process::exit(2)
    })
}

/// The kernel's smoothed RTT of a socket (TCP_INFO tcpi_rtt, µs).
fn tcp_info_rtt(s: &TcpStream) -> Option<u32> {
    let mut info = [0u8; 232];
    let mut len = info.len() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // struct tcp_info: tcpi_rtt is the u32 at offset 68.
    (r == 0 && len >= 72).then(|| u32::from_ne_bytes(info[68..72].try_into().unwrap()))
}

fn echo_server(args: &[String]) {
    let port: u16 = arg(args, "--port", 7000);
    let bind: String = arg(args, "--bind", "::".to_string());
    let l = TcpListener::bind((bind.as_str(), port)).unwrap_or_else(|e| {
        eprintln!("bind {bind}:{port}: {e}");
        std::process::exit(1)
    });
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = s;
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

fn ping_pong(args: &[String]) {
    let to = target(args);
    let count: usize = arg(args, "--count", 50);
    let interval = Duration::from_millis(arg(args, "--interval-ms", 20));
    let size: usize = arg(args, "--size", 64);
    let hold = Duration::from_millis(arg(args, "--hold-ms", 0));
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
    s.set_nodelay(true).unwrap();
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        rtts.push(t.elapsed().as_micros() as u64);
        std::thread::sleep(interval);
    }
    let srtt = tcp_info_rtt(&s);
    rtts.sort();
    let local_port = s.local_addr().map(|a| a.port()).unwrap_or(0);
    println!(
        "{{\"exchanges\":{},\"p50_us\":{},\"min_us\":{},\"max_us\":{},\"tcp_info_srtt_us\":{},\"local_port\":{}}}",
        rtts.len(),
        rtts[rtts.len() / 2],
        rtts[0],
        rtts[rtts.len() - 1],
        srtt.map(|v| v.to_string()).unwrap_or_else(|| "null".into()),
        local_port
    );
    std::io::stdout().flush().unwrap();
    std::thread::sleep(hold);
}

fn connect_loop(args: &[String]) {
    let to = target(args);
    let interval = Duration::from_millis(arg(args, "--interval-ms", 10));
    let duration = Duration::from_millis(arg(args, "--duration-ms", 1000));
    let timeout = Duration::from_millis(arg(args, "--timeout-ms", 50));
    let (mut attempts, mut successes, mut denied, mut refused, mut timeouts, mut other) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut first_success_ms: Option<u128> = None;
    while start.elapsed() < duration {
        attempts += 1;
        match TcpStream::connect_timeout(&to, timeout) {
            Ok(_) => {
                successes += 1;
                first_success_ms.get_or_insert(start.elapsed().as_millis());
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => denied += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
                timeouts += 1
            }
            Err(_) => other += 1,
        }
        std::thread::sleep(interval);
    }
    println!(
        "{{\"attempts\":{attempts},\"successes\":{successes},\"denied\":{denied},\"refused\":{refused},\"timeouts\":{timeouts},\"other\":{other},\"first_success_ms\":{}}}",
        first_success_ms
            .map(|v| v.to_string())
            .unwrap_or_else(|| "null".into())
    );
}

fn stream(args: &[String]) {
    let to = target(args);
    let duration = Duration::from_millis(arg(args, "--duration-ms", 3000));
    let chunk: usize = arg(args, "--chunk", 1024);
    let interval = Duration::from_millis(arg(args, "--interval-ms", 10));
    let mut s = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            println!("{{\"ok\":false,\"error\":\"connect: {e}\",\"bytes\":0}}");
            return;
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let msg = vec![0x33u8; chunk];
    let mut back = vec![0u8; chunk];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < duration {
        if let Err(e) = s.write_all(&msg).and_then(|_| s.read_exact(&mut back)) {
            println!("{{\"ok\":false,\"error\":\"{e}\",\"bytes\":{bytes}}}");
            return;
        }
        bytes += chunk as u64;
        std::thread::sleep(interval);
    }
    println!("{{\"ok\":true,\"error\":null,\"bytes\":{bytes}}}");
}

/// One exchange on a new connection, `--idle-ms` of silence on it, then one
/// more (with a timeout): does a connection that sat idle while rules
/// changed still get through?
fn idle_exchange(args: &[String]) {
    let to = target(args);
    let idle = Duration::from_millis(arg(args, "--idle-ms", 3000));
    let timeout = Duration::from_millis(arg(args, "--timeout-ms", 1000));
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let exchange = |s: &mut TcpStream| {
        let mut back = [0u8; 8];
        s.write_all(b"ping-one").is_ok() && s.read_exact(&mut back).is_ok()
    };
    let first = exchange(&mut s);
    println!("{{\"connected\":true}}");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(idle);
    let second = exchange(&mut s);
    println!("{{\"first\":{first},\"second\":{second}}}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("echo-server") => echo_server(&args),
        Some("ping-pong") => ping_pong(&args),
        Some("connect-loop") => connect_loop(&args),
        Some("stream") => stream(&args),
        Some("idle-exchange") => idle_exchange(&args),
        _ => {
            eprintln!("usage: flowlens-traffic echo-server|ping-pong|connect-loop|stream ...");
            std::process::exit(2);
        }
    }
}
