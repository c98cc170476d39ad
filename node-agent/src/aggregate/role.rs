//! Who opened a connection, from what the kernel saw of it.

use flowlens_agent_common::{FLOW_FLAG_SYN, FLOW_FLAG_SYN_ACK};
use flowlens_api::report::Role;

/// Ports below this are taken as server ports when no SYN was seen (the
/// Linux ephemeral range starts at 32768).
const EPHEMERAL_START: u16 = 32768;

/// The role of the local endpoint. `tx_flags`/`rx_flags` are the TCP flags
/// seen leaving/entering the local endpoint. Without a handshake (UDP, or a
/// connection older than the agent), the side with the lower well-known
/// port is the server; with no such port, the side that sent is the client.
pub(crate) fn local_role(
    tx_flags: u32,
    rx_flags: u32,
    local_port: u16,
    remote_port: u16,
    sent: bool,
) -> Role {
    if tx_flags & FLOW_FLAG_SYN != 0 || rx_flags & FLOW_FLAG_SYN_ACK != 0 {
        return Role::Client;
    }
    if rx_flags & FLOW_FLAG_SYN != 0 || tx_flags & FLOW_FLAG_SYN_ACK != 0 {
        return Role::Server;
    }
    if local_port < remote_port && local_port < EPHEMERAL_START {
        return Role::Server;
    }
    if remote_port < local_port && remote_port < EPHEMERAL_START {
        return Role::Client;
    }
    if sent { Role::Client } else { Role::Server }
}

/// The server port of a connection given the local role.
pub(crate) fn server_port(role: Role, local_port: u16, remote_port: u16) -> u16 {
    match role {
        Role::Client => remote_port,
        Role::Server => local_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_decides() {
        assert_eq!(local_role(FLOW_FLAG_SYN, 0, 40000, 80, true), Role::Client);
        assert_eq!(local_role(0, FLOW_FLAG_SYN, 80, 40000, false), Role::Server);
        assert_eq!(
            local_role(FLOW_FLAG_SYN_ACK, 0, 5201, 40000, true),
            Role::Server
        );
        // A handshake beats the port heuristic.
        assert_eq!(local_role(FLOW_FLAG_SYN, 0, 80, 40000, true), Role::Client);
    }

    #[test]
    fn ports_decide_without_handshake() {
        assert_eq!(local_role(0, 0, 53000, 53, true), Role::Client);
        assert_eq!(local_role(0, 0, 53, 53000, true), Role::Server);
        assert_eq!(local_role(0, 0, 40000, 50000, false), Role::Server);
        assert_eq!(local_role(0, 0, 40000, 50000, true), Role::Client);
        assert_eq!(server_port(Role::Client, 40000, 443), 443);
        assert_eq!(server_port(Role::Server, 443, 40000), 443);
    }
}
