//! Live flows (`kubectl flowlens observe`; see `flowlens_api::live`):
//! records agents post while someone reads ([`admit`], pure), kept and
//! fanned out by the [`hub`], served through the API server by [`api`] to
//! users it authenticated ([`front_proxy`]).

pub mod admit;
pub mod api;
pub mod front_proxy;
pub mod hub;
pub mod setup;
