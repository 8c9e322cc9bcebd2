//! WebSocket close codes kaiwa uses, with the stable reason text that goes with each.

/// Why the server closed a connection.
///
/// Codes below 4000 are the standard ones of RFC 6455; 4000–4999 are kaiwa's own. A client should
/// reconnect (with backoff) after the codes for which [`CloseCode::should_reconnect`] is true, and
/// stop otherwise: reconnecting after `duplicate_connection` would only be refused again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: the client asked to close, or the server answered a client's close.
    Normal,
    /// 1001: the server is shutting down; reconnect to another instance or later.
    GoingAway,
    /// 1008: the handshake was missing or invalid (client id, timezone, first frame).
    BadHandshake,
    /// 1009: a frame was larger than the server accepts.
    MessageTooBig,
    /// 1013: all client slots are taken (R13); retry after a backoff.
    OverCapacity,
    /// 4001: no frame (pong, heartbeat or message) arrived within the heartbeat timeout (R2).
    HeartbeatTimeout,
    /// 4002: the client sent no message within the first-message timeout (R16).
    FirstMessageTimeout,
    /// 4003: the client read its frames too slowly and its outbox filled up.
    SlowConsumer,
    /// 4004: no handshake frame arrived in time after the upgrade.
    HandshakeTimeout,
    /// 4009: another connection with the same client id is live (R15, policy `refuse`).
    DuplicateConnection,
    /// 4010: a newer connection with the same client id took over (R15, policy `replace`).
    Replaced,
}

impl CloseCode {
    pub const ALL: [CloseCode; 11] = [
        Self::Normal,
        Self::GoingAway,
        Self::BadHandshake,
        Self::MessageTooBig,
        Self::OverCapacity,
        Self::HeartbeatTimeout,
        Self::FirstMessageTimeout,
        Self::SlowConsumer,
        Self::HandshakeTimeout,
        Self::DuplicateConnection,
        Self::Replaced,
    ];

    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::BadHandshake => 1008,
            Self::MessageTooBig => 1009,
            Self::OverCapacity => 1013,
            Self::HeartbeatTimeout => 4001,
            Self::FirstMessageTimeout => 4002,
            Self::SlowConsumer => 4003,
            Self::HandshakeTimeout => 4004,
            Self::DuplicateConnection => 4009,
            Self::Replaced => 4010,
        }
    }

    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|close| close.code() == code)
    }

    /// The machine-readable name that starts every close reason kaiwa sends.
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::GoingAway => "going_away",
            Self::BadHandshake => "bad_handshake",
            Self::MessageTooBig => "message_too_big",
            Self::OverCapacity => "over_capacity",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::FirstMessageTimeout => "first_message_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::DuplicateConnection => "duplicate_connection",
            Self::Replaced => "replaced",
        }
    }

    pub fn should_reconnect(self) -> bool {
        !matches!(
            self,
            Self::BadHandshake | Self::MessageTooBig | Self::DuplicateConnection | Self::Replaced
        )
    }

    /// A close reason: `"<name>: <detail>"`, cut to the 123 bytes a close frame can carry.
    pub fn reason(self, detail: &str) -> String {
        const MAX: usize = 123;
        let mut reason = format!("{}: {detail}", self.name());
        if reason.len() > MAX {
            let mut cut = MAX;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for close in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(close.code()), Some(close));
        }
        assert_eq!(CloseCode::from_code(4999), None);
    }

    #[test]
    fn reasons_fit_in_a_close_frame_even_with_multibyte_text() {
        let reason = CloseCode::BadHandshake.reason(&"時".repeat(100));
        assert!(reason.len() <= 123);
        assert!(reason.starts_with("bad_handshake: "));
    }
}
