//! Traffic tools for the tests, run inside pod network namespaces. Every
//! client prints one JSON line with what it measured.
//!
//! ```text
//! flowlens-traffic echo-server --port P
//! flowlens-traffic ping-pong --to IP:PORT [--count N] [--interval-ms M] [--size S] [--hold-ms H]
//! flowlens-traffic connect-loop --to IP:PORT [--interval-ms 10] [--duration-ms D] [--timeout-ms T]
//! flowlens-traffic stream --to IP:PORT [--duration-ms D] [--chunk S] [--interval-ms M]
//! flowlens-traffic idle-exchange --to IP:PORT --idle-ms I [--timeout-ms T]
//! flowlens-traffic resolve --server IP:PORT --name NAME [--type A|AAAA] [--tcp] [--connect PORT]
//! flowlens-traffic dns-junk --to IP:PORT [--from-port P] [--forge-address IPV4]
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

/// A DNS query to `--server` (UDP, or TCP with `--tcp`), as a stub
/// resolver sends it; prints the response code, the addresses, the time to
/// the answer, and, with `--connect PORT`, whether a TCP exchange with the
/// first address on that port worked.
fn resolve(args: &[String]) {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData, RecordType},
    };
    let server: SocketAddr = arg(args, "--server", String::new())
        .parse()
        .unwrap_or_else(|_| {
            eprintln!("--server IP:PORT is required");
            std::process::exit(2)
        });
    let name: String = arg(args, "--name", String::new());
    let qtype = match arg(args, "--type", "A".to_string()).as_str() {
        "AAAA" => RecordType::AAAA,
        _ => RecordType::A,
    };
    let tcp = args.iter().any(|a| a == "--tcp");
    let connect: u16 = arg(args, "--connect", 0);
    let name = Name::from_ascii(&name).unwrap_or_else(|e| {
        eprintln!("--name {name:?}: {e}");
        std::process::exit(2)
    });
    let id: u16 = std::process::id() as u16 ^ 0x5a5a;
    let mut q = Message::new(id, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name, qtype));
    let wire = q.to_vec().expect("encoding the query");
    let t0 = Instant::now();
    let answer = if tcp {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&wire);
        s.write_all(&framed).expect("send");
        let mut len = [0u8; 2];
        s.read_exact(&mut len).expect("answer length");
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).expect("answer");
        buf
    } else {
        let bind = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = std::net::UdpSocket::bind(bind).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(&wire, server).expect("send");
        let mut buf = vec![0u8; 4096];
        let n = s.recv(&mut buf).expect("no answer within 5 s");
        buf.truncate(n);
        buf
    };
    let elapsed = t0.elapsed();
    let m = Message::from_vec(&answer).expect("a readable answer");
    let addrs: Vec<std::net::IpAddr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(std::net::IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    let connected = match (connect, addrs.first()) {
        (0, _) | (_, None) => false,
        (port, Some(ip)) => {
            TcpStream::connect_timeout(&SocketAddr::new(*ip, port), Duration::from_secs(5))
                .and_then(|mut s| {
                    s.write_all(b"hello")?;
                    let mut b = [0u8; 5];
                    s.read_exact(&mut b)
                })
                .is_ok()
        }
    };
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    println!(
        "{{\"rcode\":{},\"id\":{id},\"addresses\":{:?},\"elapsed_us\":{},\"connected\":{connected}}}",
        u16::from(m.metadata.response_code.low()),
        addrs,
        elapsed.as_micros()
    );
}

/// Malformed, truncated and unsolicited DNS messages sent from
/// `--from-port` (53: they look like answers) to `--to`, as a hostile pod
/// would. Prints how many were sent.
fn dns_junk(args: &[String]) {
    let to = target(args);
    let from: u16 = arg(args, "--from-port", 53);
    let forged: std::net::Ipv4Addr = arg(
        args,
        "--forge-address",
        std::net::Ipv4Addr::new(192, 0, 2, 66),
    );
    let bind: SocketAddr = if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], from))
    } else {
        SocketAddr::from(([0u16; 8], from))
    };
    let s = std::net::UdpSocket::bind(bind).unwrap_or_else(|e| {
        eprintln!("bind {bind}: {e}");
        std::process::exit(1)
    });
    let header = |id: u16, flags: u16, qd: u16, an: u16| {
        let mut h = Vec::with_capacity(12);
        for v in [id, flags, qd, an, 0, 0] {
            h.extend_from_slice(&v.to_be_bytes());
        }
        h
    };
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x12],
        header(1, 0x8180, 1, 0)[..11].to_vec(),
        // 65535 answers promised, none present.
        header(2, 0x8180, 0, 0xffff),
        // A question whose name points at itself.
        [header(3, 0x8180, 1, 0), vec![0xc0, 12, 0, 1, 0, 1]].concat(),
        // A label longer than the message.
        [header(4, 0x8180, 1, 0), vec![63, b'a', b'b']].concat(),
        // An answer whose data length runs past the end.
        [
            header(5, 0x8180, 1, 1),
            vec![1, b'x', 0, 0, 1, 0, 1],
            vec![0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0xff, 0xff, 1, 2],
        ]
        .concat(),
    ];
    // Well formed, but answering no query: must teach no name
    // (`evil.example` is `--forge-address`).
    junk.push(
        [
            header(6, 0x8180, 1, 1),
            vec![4, b'e', b'v', b'i', b'l', 7],
            b"example".to_vec(),
            vec![0, 0, 1, 0, 1],
            vec![0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4],
            forged.octets().to_vec(),
        ]
        .concat(),
    );
    let mut x: u32 = 0x1234_5678;
    for len in [12usize, 40, 200, 600, 1400] {
        junk.push(
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect(),
        );
    }
    let mut sent = 0;
    for j in &junk {
        if s.send_to(j, to).is_ok() {
            sent += 1;
        }
    }
    println!("{{\"sent\":{sent}}}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("echo-server") => echo_server(&args),
        Some("ping-pong") => ping_pong(&args),
        Some("connect-loop") => connect_loop(&args),
        Some("stream") => stream(&args),
        Some("idle-exchange") => idle_exchange(&args),
        Some("resolve") => resolve(&args),
        Some("dns-junk") => dns_junk(&args),
        _ => {
            eprintln!(
                "usage: flowlens-traffic echo-server|ping-pong|connect-loop|stream|idle-exchange|resolve|dns-junk ..."
            );
            std::process::exit(2);
        }
    }
}
