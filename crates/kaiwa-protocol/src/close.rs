//! WebSocket close codes kaiwa uses, with the stable reason text that goes with each, and the
//! rule that tells a client whether to reconnect after a close.

/// Why the server closed a connection.
///
/// Codes below 4000 are the standard ones of RFC 6455, kept for the legacy clients that know
/// them. kaiwa's own codes come in two ranges, so that a client can act on a code it has never
/// seen: 4000–4499 mean "come back" (reconnect with backoff, resuming), 4500–4999 mean "do not
/// reconnect on your own" (something about this client or its request has to change first).
/// [`reconnects`] applies the rule to any code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: the client asked to close, or the server answered a client's close.
    Normal,
    /// 1001: the server is shutting down; reconnect to another instance or later.
    GoingAway,
    /// 1007: a text frame was not valid UTF-8.
    InvalidPayload,
    /// 1008: the handshake was missing or invalid (client id, timezone, first frame).
    BadHandshake,
    /// 1009: a frame was larger than the server accepts.
    MessageTooBig,
    /// 1011: the server could not serve the connection (its store failed); retry shortly.
    InternalError,
    /// 1013: all client slots are taken (R13); retry after a backoff.
    OverCapacity,
    /// 4001: no frame (pong, heartbeat or message) arrived within the heartbeat timeout (R2).
    HeartbeatTimeout,
    /// 4003: the client read its frames too slowly: its outbox filled up.
    SlowConsumer,
    /// 4004: no handshake frame arrived in time after the upgrade.
    HandshakeTimeout,
    /// 4005: too many connections were in their handshake, and this one, the oldest, made room
    /// for a newer one. Reconnect, and send the handshake frame at once.
    CrowdedOut,
    /// 4502: the client sent no message within the first-message timeout (R16). Reconnecting at
    /// once would only hold an idle slot again: connect when there is something to send.
    FirstMessageTimeout,
    /// 4509: another connection with the same client id is live (R15, policy `refuse`).
    DuplicateConnection,
    /// 4510: a newer connection with the same client id took over (R15, policy `replace`).
    Replaced,
    /// 4601: auth is on and the client gave no token.
    MissingToken,
    /// 4602: the token is not a JWT the server accepts (shape, algorithm, missing claims).
    MalformedToken,
    /// 4603: the token has expired: at the handshake, or during the session with no `refresh`
    /// within the grace period.
    ExpiredToken,
    /// 4604: the token's signature does not verify with any of the server's secrets.
    InvalidTokenSignature,
    /// 4605: the token was issued for another audience.
    WrongTokenAudience,
    /// 4606: the handshake's `client_id` is not the token's `sub`.
    ClientIdMismatch,
}

/// Whether a client should reconnect (with backoff) after a close with `code`, for any code,
/// known or not: kaiwa's own codes by their range, the standard ones by their meaning.
pub fn reconnects(code: u16) -> bool {
    match code {
        // Going away, abnormal closure, internal error, restart, try again later, bad gateway,
        // and the codes a browser reports for a connection that ended without a close frame.
        1000 | 1001 | 1005 | 1006 | 1011 | 1012 | 1013 | 1014 => true,
        // Protocol error, unsupported data, invalid payload, policy violation, too big,
        // missing extension: sending the same again gets the same answer.
        1002 | 1003 | 1007 | 1008 | 1009 | 1010 => false,
        4000..=4499 => true,
        4500..=4999 => false,
        _ => true,
    }
}

impl CloseCode {
    pub const ALL: [CloseCode; 20] = [
        Self::Normal,
        Self::GoingAway,
        Self::InvalidPayload,
        Self::BadHandshake,
        Self::MessageTooBig,
        Self::InternalError,
        Self::OverCapacity,
        Self::HeartbeatTimeout,
        Self::SlowConsumer,
        Self::HandshakeTimeout,
        Self::CrowdedOut,
        Self::FirstMessageTimeout,
        Self::DuplicateConnection,
        Self::Replaced,
        Self::MissingToken,
        Self::MalformedToken,
        Self::ExpiredToken,
        Self::InvalidTokenSignature,
        Self::WrongTokenAudience,
        Self::ClientIdMismatch,
    ];

    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::InvalidPayload => 1007,
            Self::BadHandshake => 1008,
            Self::MessageTooBig => 1009,
            Self::InternalError => 1011,
            Self::OverCapacity => 1013,
            Self::HeartbeatTimeout => 4001,
            Self::SlowConsumer => 4003,
            Self::HandshakeTimeout => 4004,
            Self::CrowdedOut => 4005,
            Self::FirstMessageTimeout => 4502,
            Self::DuplicateConnection => 4509,
            Self::Replaced => 4510,
            Self::MissingToken => 4601,
            Self::MalformedToken => 4602,
            Self::ExpiredToken => 4603,
            Self::InvalidTokenSignature => 4604,
            Self::WrongTokenAudience => 4605,
            Self::ClientIdMismatch => 4606,
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
            Self::InvalidPayload => "invalid_payload",
            Self::BadHandshake => "bad_handshake",
            Self::MessageTooBig => "message_too_big",
            Self::InternalError => "internal_error",
            Self::OverCapacity => "over_capacity",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::CrowdedOut => "crowded_out",
            Self::FirstMessageTimeout => "first_message_timeout",
            Self::DuplicateConnection => "duplicate_connection",
            Self::Replaced => "replaced",
            Self::MissingToken => "missing_token",
            Self::MalformedToken => "malformed_token",
            Self::ExpiredToken => "expired_token",
            Self::InvalidTokenSignature => "invalid_token_signature",
            Self::WrongTokenAudience => "wrong_token_audience",
            Self::ClientIdMismatch => "client_id_mismatch",
        }
    }

    pub fn should_reconnect(self) -> bool {
        reconnects(self.code())
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
    fn kaiwa_codes_say_by_their_range_whether_to_reconnect() {
        let come_back = [
            CloseCode::GoingAway,
            CloseCode::InternalError,
            CloseCode::OverCapacity,
            CloseCode::HeartbeatTimeout,
            CloseCode::SlowConsumer,
            CloseCode::HandshakeTimeout,
            CloseCode::CrowdedOut,
        ];
        let stay_away = [
            CloseCode::InvalidPayload,
            CloseCode::BadHandshake,
            CloseCode::MessageTooBig,
            CloseCode::FirstMessageTimeout,
            CloseCode::DuplicateConnection,
            CloseCode::Replaced,
            CloseCode::MissingToken,
            CloseCode::MalformedToken,
            CloseCode::ExpiredToken,
            CloseCode::InvalidTokenSignature,
            CloseCode::WrongTokenAudience,
            CloseCode::ClientIdMismatch,
        ];
        for close in come_back {
            assert!(close.should_reconnect(), "{close:?}");
        }
        for close in stay_away {
            assert!(!close.should_reconnect(), "{close:?}");
        }
        for close in CloseCode::ALL.into_iter().filter(|c| c.code() >= 4000) {
            assert_eq!(close.should_reconnect(), close.code() < 4500, "{close:?}");
        }
        assert!(reconnects(4321), "an unknown code in the reconnect range");
        assert!(!reconnects(4777), "an unknown code in the terminal range");
    }

    #[test]
    fn reasons_fit_in_a_close_frame_even_with_multibyte_text() {
        let reason = CloseCode::BadHandshake.reason(&"時".repeat(100));
        assert!(reason.len() <= 123);
        assert!(reason.starts_with("bad_handshake: "));
    }
}
