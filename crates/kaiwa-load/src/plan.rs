//! Who the simulated clients are and what they send: ids, random IANA timezones, how many
//! messages each sends (every client at least one), the mix of message types, and the pace
//! (as fast as answers come back, or on a fixed open-loop schedule).

use chrono_tz::{TZ_VARIANTS, Tz};
use kaiwa_protocol::MessageType;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

/// Relative weights of the message types, e.g. `text=4,voice=2,video=2,image=2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(MessageType, u32)>,
    total: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a message mix: use e.g. text=4,voice=2,video=2,image=2 or text")]
pub struct MixError(String);

impl FromStr for Mix {
    type Err = MixError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || MixError(text.to_owned());
        let mut weights = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match part.split_once('=') {
                Some((name, weight)) => (name, weight.trim().parse().map_err(|_| bad())?),
                None => (part, 1),
            };
            let kind = MessageType::parse(name.trim()).ok_or_else(bad)?;
            if weight > 0 {
                weights.push((kind, weight));
            }
        }
        let total = weights.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err(bad());
        }
        Ok(Self { weights, total })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(kind, weight)| format!("{kind}={weight}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Mix {
    /// The spec scenario's mix: mostly text, and every media type.
    pub fn spec() -> Self {
        Self {
            weights: vec![
                (MessageType::Text, 4),
                (MessageType::Voice, 2),
                (MessageType::Video, 2),
                (MessageType::Image, 2),
            ],
            total: 10,
        }
    }

    pub fn text() -> Self {
        Self {
            weights: vec![(MessageType::Text, 1)],
            total: 1,
        }
    }

    pub fn pick(&self, rng: &mut StdRng) -> MessageType {
        let mut roll = rng.random_range(0..self.total);
        for (kind, weight) in &self.weights {
            if roll < *weight {
                return *kind;
            }
            roll -= weight;
        }
        MessageType::Text
    }
}

/// How a client paces its sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Keep up to `window` messages unanswered; send the next as soon as one settles.
    Closed { window: usize },
    /// Send on a fixed schedule, whatever comes back: message `k` is due at
    /// `start + phase + k * interval`. Latency counts from that due time.
    Open { interval: Duration, phase: Duration },
}

impl Pace {
    /// The open-loop pace of client `index` of `clients` sharing `rate` messages per second
    /// evenly: each sends every `clients / rate` seconds, the clients staggered by `1 / rate`.
    pub fn open(rate: f64, clients: usize, index: usize) -> Self {
        let gap = 1.0 / rate;
        Self::Open {
            interval: Duration::from_secs_f64(gap * clients as f64),
            phase: Duration::from_secs_f64(gap * index as f64),
        }
    }
}

/// One simulated client.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    pub index: usize,
    pub client_id: String,
    pub timezone: Tz,
    /// How many messages it sends; `None` to send until the run's deadline.
    pub messages: Option<u64>,
    /// The loopback address to connect from, when connections are spread over several.
    pub source: Option<IpAddr>,
    pub seed: u64,
    /// Its token, when the server has auth on.
    pub token: Option<String>,
}

/// `clients` clients with random timezones. With `total` messages, every client gets one and
/// the rest are spread at random, so each sends at least one (R16) and the counts vary.
pub fn clients(clients: usize, total: Option<u64>, seed: u64, run_id: &str) -> Vec<ClientPlan> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut counts: Option<Vec<u64>> = total.map(|total| {
        let mut counts = vec![u64::from(total >= clients as u64); clients];
        let rest = total.saturating_sub(clients as u64);
        for _ in 0..rest {
            counts[rng.random_range(0..clients)] += 1;
        }
        // Fewer messages than clients: the first `total` clients send one each.
        if total < clients as u64 {
            for count in counts.iter_mut().take(total as usize) {
                *count = 1;
            }
        }
        counts
    });
    (0..clients)
        .map(|index| ClientPlan {
            index,
            client_id: format!("load-{run_id}-{index}"),
            timezone: random_timezone(&mut rng),
            messages: counts.as_mut().map(|counts| counts[index]),
            source: None,
            seed: seed.wrapping_add(index as u64 + 1),
            token: None,
        })
        .collect()
}

/// Which of `urls` endpoints client `index` uses: client i takes url[i % n], for its first
/// connection and every reconnect, so consecutive clients land on different gateways and each
/// stays on its own (a reply that had to follow it elsewhere is the server's job, not the
/// tool's).
pub fn endpoint(index: usize, urls: usize) -> usize {
    index % urls.max(1)
}

/// How many of `clients` clients [`endpoint`] gives to each of `urls` endpoints.
pub fn clients_per_endpoint(clients: usize, urls: usize) -> Vec<usize> {
    let urls = urls.max(1);
    (0..urls)
        .map(|u| clients / urls + usize::from(u < clients % urls))
        .collect()
}

/// Any zone of the tz database, half-hour and 45-minute ones included.
pub fn random_timezone(rng: &mut StdRng) -> Tz {
    TZ_VARIANTS.choose(rng).copied().unwrap_or(Tz::UTC)
}

/// A short random id that keeps this run's client ids apart from earlier runs' (kaiwa
/// remembers client message ids for good).
pub fn run_id(seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x006b_6169_7761);
    let mut entropy = rand::rng();
    let n: u32 = rng.random::<u32>() ^ entropy.random::<u32>();
    format!("{n:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_sends_at_least_one_message_and_the_total_is_kept() {
        let plans = clients(100, Some(2_000), 7, "t");
        assert_eq!(plans.len(), 100);
        assert!(plans.iter().all(|p| p.messages.is_some_and(|m| m >= 1)));
        let total: u64 = plans.iter().filter_map(|p| p.messages).sum();
        assert_eq!(total, 2_000);
        let zones: std::collections::HashSet<_> = plans.iter().map(|p| p.timezone).collect();
        assert!(zones.len() > 50, "timezones are spread: {}", zones.len());
    }

    #[test]
    fn fewer_messages_than_clients_gives_the_first_clients_one_each() {
        let plans = clients(5, Some(3), 1, "t");
        let counts: Vec<u64> = plans.iter().filter_map(|p| p.messages).collect();
        assert_eq!(counts, vec![1, 1, 1, 0, 0]);
    }

    #[test]
    fn mixes_parse_and_pick_only_their_types() {
        let mix: Mix = "voice=1, image=3".parse().expect("a mix");
        assert_eq!(mix.to_string(), "voice=1,image=3");
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            assert!(matches!(
                mix.pick(&mut rng),
                MessageType::Voice | MessageType::Image
            ));
        }
        assert!("sticker=1".parse::<Mix>().is_err());
        assert!("text=0".parse::<Mix>().is_err());
        assert_eq!("text".parse::<Mix>(), Ok(Mix::text()));
    }

    #[test]
    fn clients_take_the_endpoints_in_turn() {
        let picked: Vec<usize> = (0..7).map(|i| endpoint(i, 3)).collect();
        assert_eq!(picked, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(clients_per_endpoint(7, 3), [3, 2, 2]);
        assert_eq!(clients_per_endpoint(2, 3), [1, 1, 0]);
        assert_eq!(endpoint(5, 1), 0);
    }

    #[test]
    fn open_loop_clients_share_the_rate_evenly() {
        let Pace::Open { interval, phase } = Pace::open(1_000.0, 50, 10) else {
            panic!("an open pace");
        };
        assert_eq!(interval, Duration::from_millis(50));
        assert_eq!(phase, Duration::from_millis(10));
    }
}
