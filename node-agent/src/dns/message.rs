//! One DNS message as the kernel copied it, parsed with hickory-proto.
//! Pure: bytes in, facts out. Nothing from the packet is trusted: lengths
//! and counts are the parser's to check, a name that is not a plain DNS
//! name is dropped, and only answers reachable from the question (through
//! its CNAME chain) name an address.

use std::net::IpAddr;

use flowlens_api::dns::check_name;
use hickory_proto::{
    op::{Header, Message, MessageType, Query},
    rr::{Name, RData},
    serialize::binary::{BinDecodable, BinDecoder},
};

/// CNAME links followed from the question at most.
const MAX_CNAME_HOPS: usize = 8;
/// Addresses taken from one answer at most.
const MAX_ANSWERS: usize = 64;

/// What one message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DnsMessage {
    pub id: u16,
    pub response: bool,
    /// The response code (the header's four bits; EDNS extended codes are
    /// not combined).
    pub rcode: u16,
    /// The first question's name, lower case without the final dot, when
    /// it is a plain DNS name.
    pub qname: Option<String>,
    /// Addresses answering the question (directly or through its CNAME
    /// chain), with their TTL in seconds.
    pub answers: Vec<(IpAddr, u32)>,
    /// The copy was cut before the message ended: header and question
    /// only, no answers.
    pub cut: bool,
}

/// Why a copied message could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("shorter than a DNS header")]
    Short,
    #[error("a TCP segment that does not start a length-prefixed message")]
    TcpFraming,
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Parses a message copied from a packet's payload. `payload_len` is the
/// payload's real length (more than `copied.len()` when the copy was cut);
/// over TCP the message follows a two-byte length.
pub(crate) fn parse(
    copied: &[u8],
    payload_len: usize,
    tcp: bool,
) -> Result<DnsMessage, ParseError> {
    let (bytes, whole) = if tcp {
        let [hi, lo, rest @ ..] = copied else {
            return Err(ParseError::TcpFraming);
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        // One message per segment, starting it: anything else is a later
        // segment of a stream this copy cannot reassemble.
        if len + 2 != payload_len || len < 12 {
            return Err(ParseError::TcpFraming);
        }
        (rest, copied.len() == payload_len)
    } else {
        (copied, copied.len() >= payload_len)
    };
    if bytes.len() < 12 {
        return Err(ParseError::Short);
    }
    if whole {
        let m = Message::from_vec(bytes).map_err(|e| ParseError::Malformed(e.to_string()))?;
        return Ok(from_message(&m));
    }
    // Cut: the header and the first question still tell the id, the code
    // and the name asked.
    let mut d = BinDecoder::new(bytes);
    let h = Header::read(&mut d).map_err(|e| ParseError::Malformed(e.to_string()))?;
    let qname = if h.counts.queries > 0 {
        Query::read(&mut d).ok().and_then(|q| plain_name(&q.name))
    } else {
        None
    };
    Ok(DnsMessage {
        id: h.metadata.id,
        response: h.metadata.message_type == MessageType::Response,
        rcode: u16::from(h.metadata.response_code.low()),
        qname,
        answers: Vec::new(),
        cut: true,
    })
}

fn from_message(m: &Message) -> DnsMessage {
    let question = m.queries.first().map(|q| q.name.to_lowercase());
    let mut answers = Vec::new();
    if let Some(q) = &question {
        // The question's name and every name its CNAME chain leads to.
        let mut names: Vec<Name> = vec![q.clone()];
        for _ in 0..MAX_CNAME_HOPS {
            let before = names.len();
            for r in &m.answers {
                if let RData::CNAME(target) = &r.data
                    && names.contains(&r.name.to_lowercase())
                {
                    let t = target.0.to_lowercase();
                    if !names.contains(&t) {
                        names.push(t);
                    }
                }
            }
            if names.len() == before {
                break;
            }
        }
        for r in &m.answers {
            if answers.len() >= MAX_ANSWERS {
                break;
            }
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            if names.contains(&r.name.to_lowercase()) {
                answers.push((ip, r.ttl));
            }
        }
    }
    DnsMessage {
        id: m.metadata.id,
        response: m.metadata.message_type == MessageType::Response,
        rcode: u16::from(m.metadata.response_code.low()),
        qname: question.as_ref().and_then(plain_name),
        answers,
        cut: false,
    }
}

/// A name as Flowlens shows it (lower case, no final dot), if it is a
/// plain DNS name.
fn plain_name(n: &Name) -> Option<String> {
    let s = n.to_lowercase().to_ascii();
    let s = s.strip_suffix('.').unwrap_or(&s).to_owned();
    check_name(&s).is_ok().then_some(s)
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, str::FromStr};

    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query, ResponseCode},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn answer(id: u16, q: &str, records: Vec<Record>, code: ResponseCode) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        m.add_query(Query::query(name(q), RecordType::A));
        for r in records {
            m.add_answer(r);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn an_answer_names_its_addresses_through_the_cname_chain() {
        let bytes = answer(
            7,
            "WWW.Payments.Example.",
            vec![
                Record::from_rdata(
                    name("www.payments.example."),
                    60,
                    RData::CNAME(CNAME(name("api.payments.example."))),
                ),
                Record::from_rdata(
                    name("api.payments.example."),
                    30,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
                ),
                Record::from_rdata(
                    name("api.payments.example."),
                    30,
                    RData::AAAA(AAAA("2001:db8::7".parse().unwrap())),
                ),
                // Not on the chain: never taken.
                Record::from_rdata(
                    name("bank.example."),
                    30,
                    RData::A(A(Ipv4Addr::new(203, 0, 113, 1))),
                ),
            ],
            ResponseCode::NoError,
        );
        let m = parse(&bytes, bytes.len(), false).unwrap();
        assert_eq!(m.id, 7);
        assert!(m.response);
        assert_eq!(m.rcode, 0);
        assert_eq!(m.qname.as_deref(), Some("www.payments.example"));
        assert_eq!(
            m.answers,
            vec![
                ("192.0.2.7".parse().unwrap(), 30),
                ("2001:db8::7".parse().unwrap(), 30)
            ]
        );
        assert!(!m.cut);
    }

    #[test]
    fn nxdomain_and_queries_are_read() {
        let bytes = answer(9, "missing.example.", vec![], ResponseCode::NXDomain);
        let m = parse(&bytes, bytes.len(), false).unwrap();
        assert_eq!((m.rcode, m.answers.len()), (3, 0));
        let mut q = Message::new(11, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(name("api.example."), RecordType::AAAA));
        let bytes = q.to_vec().unwrap();
        let m = parse(&bytes, bytes.len(), false).unwrap();
        assert!(!m.response);
        assert_eq!(m.qname.as_deref(), Some("api.example"));
    }

    #[test]
    fn a_cut_copy_keeps_header_and_question() {
        let bytes = answer(
            5,
            "big.example.",
            (0..40)
                .map(|i| {
                    Record::from_rdata(
                        name("big.example."),
                        5,
                        RData::A(A(Ipv4Addr::new(198, 51, 100, i))),
                    )
                })
                .collect(),
            ResponseCode::NoError,
        );
        assert!(bytes.len() > 512);
        let m = parse(&bytes[..512], bytes.len(), false).unwrap();
        assert_eq!((m.id, m.cut, m.answers.len()), (5, true, 0));
        assert_eq!(m.qname.as_deref(), Some("big.example"));
    }

    #[test]
    fn tcp_messages_carry_their_length() {
        let msg = answer(3, "t.example.", vec![], ResponseCode::ServFail);
        let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&msg);
        let m = parse(&framed, framed.len(), true).unwrap();
        assert_eq!(m.rcode, 2);
        // A later segment of a stream, or a wrong length.
        assert_eq!(parse(&msg, msg.len(), true), Err(ParseError::TcpFraming));
        assert_eq!(parse(&[0], 1, true), Err(ParseError::TcpFraming));
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        assert_eq!(parse(&[1, 2, 3], 3, false), Err(ParseError::Short));
        // A header claiming 65535 answers with none present.
        let mut h = vec![0u8, 1, 0x81, 0x80, 0, 1, 0xff, 0xff, 0, 0, 0, 0];
        h.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
        assert!(matches!(
            parse(&h, h.len(), false),
            Err(ParseError::Malformed(_))
        ));
        // A compression pointer to itself.
        let mut p = vec![0u8, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(parse(&p, p.len(), false).is_err());
        // A name that is no plain name is dropped, the rest kept.
        let mut bytes = vec![0u8, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&[3, b'a', b' ', b'b', 7]);
        bytes.extend_from_slice(b"example");
        bytes.extend_from_slice(&[0, 0, 1, 0, 1]);
        let m = parse(&bytes, bytes.len(), false).unwrap();
        assert_eq!(m.qname, None);
        // Random bytes never panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 12..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse(&buf, buf.len(), false);
            let _ = parse(&buf, buf.len() + 100, false);
            let _ = parse(&buf, buf.len(), true);
        }
    }
}
