use aya::{Ebpf, include_bytes_aligned};

static EBPF: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowlens-agent-ebpf"));

fn main() -> anyhow::Result<()> {
    let mut ebpf = Ebpf::load(EBPF)?;
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    for name in names {
        let prog = ebpf.program_mut(&name).unwrap();
        let r = match prog {
            aya::programs::Program::SchedClassifier(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            aya::programs::Program::TracePoint(p) => p.load(),
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            _ => Ok(()),
        };
        println!("{name}: {r:?}");
    }
    Ok(())
}
