//! `PgPresence` against a PostgreSQL database of each test's own, two instances standing for
//! two gateways: the exact client limit under concurrent takes, client ids held, replaced and
//! given back only by their holder, spare slots given back, and what a dead or restarted
//! gateway held coming back.

use super::block::SPARE;
use super::{Claim, PgPresence, Presence};
use crate::domain::{ClientId, GatewayId};
use crate::store::PgStore;
use futures::future::join_all;
use std::collections::HashSet;
use std::time::Duration;

use crate::store::contract::test_postgres::TestDatabase;

const LEASE: Duration = Duration::from_secs(10);

async fn database() -> TestDatabase {
    let database = TestDatabase::create().await;
    PgStore::migrate(&database.url)
        .await
        .expect("the schema is applied");
    database
}

async fn gateway(database: &TestDatabase, id: &str, lease: Duration, max: u32) -> PgPresence {
    let presence = PgPresence::connect(&database.url, GatewayId::new(id), lease)
        .await
        .expect("presence connects");
    presence.join(max).await.expect("the gateway joins");
    presence
}

fn client(id: &str) -> ClientId {
    ClientId::parse(id).expect("a client id")
}

async fn scalar(database: &TestDatabase, sql: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&database.url)
        .await
        .expect("the test connects");
    let value: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&pool)
        .await
        .expect("the query answers");
    pool.close().await;
    value
}

async fn rows_of(database: &TestDatabase, gateway: &str) -> i64 {
    scalar(
        database,
        &format!("SELECT COUNT(*) FROM client_slots WHERE gateway_id = '{gateway}'"),
    )
    .await
}

/// A slot for connection `conn`, if the cluster has one.
async fn try_take(presence: &PgPresence, conn: u64, max: u32) -> Option<u32> {
    presence.take_slot(conn, max).await.expect("no outage")
}

/// A slot for connection `conn`, which the test knows is there.
async fn take(presence: &PgPresence, conn: u64, max: u32) -> u32 {
    try_take(presence, conn, max).await.expect("a slot")
}

#[tokio::test]
async fn two_gateways_taking_at_once_never_pass_the_limit_and_leave_no_slot_unused() {
    let database = database().await;
    let max = 100;
    let a = gateway(&database, "gw-a", LEASE, max).await;
    let b = gateway(&database, "gw-b", LEASE, max).await;
    // 150 connections on each gateway at once, for 100 slots.
    let takes = (0..300u64).map(|conn| {
        let presence = if conn % 2 == 0 { &a } else { &b };
        async move { (conn, try_take(presence, conn, max).await) }
    });
    let taken: Vec<(u64, u32)> = join_all(takes)
        .await
        .into_iter()
        .filter_map(|(conn, slot)| slot.map(|slot| (conn, slot)))
        .collect();
    assert_eq!(taken.len(), 100, "exactly the limit");
    let distinct: HashSet<u32> = taken.iter().map(|(_, slot)| *slot).collect();
    assert_eq!(distinct.len(), 100, "no slot twice");
    assert!(distinct.iter().all(|slot| (1..=max).contains(slot)));
    assert_eq!(
        rows_of(&database, "gw-a").await + rows_of(&database, "gw-b").await,
        100
    );

    // One leaving on either gateway frees a slot the other can take: the cluster is short,
    // so no gateway keeps a spare one. (Which gateway holds how many is a race: one whose
    // first fetch came late may hold none.)
    let (conn, slot) = taken[0];
    let (holder, other) = if conn % 2 == 0 { (&a, &b) } else { (&b, &a) };
    holder.release_slot(slot, conn).await;
    assert!(try_take(other, 1000, max).await.is_some());
    assert_eq!(try_take(other, 1001, max).await, None);
    assert_eq!(try_take(holder, 1002, max).await, None);
}

#[tokio::test]
async fn clients_leaving_all_at_once_give_back_every_surplus_slot() {
    let database = database().await;
    let max = 5000;
    let a = gateway(&database, "gw-a", LEASE, max).await;
    let taken: Vec<(u64, u32)> = join_all((0..1000u64).map(|conn| {
        let a = &a;
        async move { (conn, take(a, conn, max).await) }
    }))
    .await;
    // Their give-backs wait for one another and go together.
    join_all(taken.iter().map(|&(conn, slot)| a.release_slot(slot, conn))).await;
    let held = rows_of(&database, "gw-a").await;
    let listed = i64::try_from(a.block_held()).expect("small");
    assert_eq!(held, listed, "the table holds what the block lists");
    assert!(
        held <= 2 * SPARE as i64,
        "the surplus is given back: {held}"
    );
}

#[tokio::test]
async fn a_gateway_fetches_a_block_and_gives_back_its_surplus() {
    let database = database().await;
    // Large enough for the whole spare.
    let max = 2000;
    let a = gateway(&database, "gw-a", LEASE, max).await;
    let slot = take(&a, 1, max).await;
    assert_eq!(
        rows_of(&database, "gw-a").await,
        i64::try_from(1 + SPARE).expect("small"),
        "one fetch brings spare slots"
    );
    // The next connections take spare slots without a fetch.
    for conn in 2..=8 {
        take(&a, conn, max).await;
    }
    assert_eq!(rows_of(&database, "gw-a").await, 1 + SPARE as i64);

    // Many leaving at once give back all but twice the spare, as they go.
    let many: Vec<(u64, u32)> = join_all((100..100 + 3 * SPARE as u64).map(|conn| {
        let a = &a;
        async move { (conn, take(a, conn, max).await) }
    }))
    .await;
    for (conn, slot) in many {
        a.release_slot(slot, conn).await;
    }
    let held = rows_of(&database, "gw-a").await;
    assert!(held <= 8 + 2 * SPARE as i64, "surplus given back: {held}");

    // Renewals: spares kept while slots were taken lately, all given back once idle.
    assert!(a.renew(&[]).await.expect("renewed"));
    assert!(a.renew(&[]).await.expect("renewed"));
    a.release_slot(slot, 1).await;
    assert!(a.renew(&[]).await.expect("renewed"));
    assert_eq!(
        rows_of(&database, "gw-a").await,
        7,
        "only the slots in use stay"
    );
}

#[tokio::test]
async fn a_client_id_is_held_by_a_live_gateway_and_replace_takes_it() {
    let database = database().await;
    let a = gateway(&database, "gw-a", LEASE, 10).await;
    let b = gateway(&database, "gw-b", LEASE, 10).await;
    let id = client("solo");
    assert_eq!(
        a.claim(&id, 7, false).await.expect("no outage"),
        Claim::Claimed { replaced: None }
    );
    assert_eq!(
        b.claim(&id, 9, false).await.expect("no outage"),
        Claim::Held {
            gateway: GatewayId::new("gw-a"),
            conn_id: 7
        }
    );
    assert_eq!(
        b.claim(&id, 9, true).await.expect("no outage"),
        Claim::Claimed {
            replaced: Some((GatewayId::new("gw-a"), 7))
        }
    );
    assert_eq!(
        b.holder(&id).await.expect("no outage"),
        Some(GatewayId::new("gw-b"))
    );
    // Its own gateway's registry decides between its connections: claimed again.
    assert_eq!(
        b.claim(&id, 10, false).await.expect("no outage"),
        Claim::Claimed { replaced: None }
    );
}

#[tokio::test]
async fn many_claims_of_the_same_ids_from_two_gateways_at_once_give_each_id_to_one() {
    let database = database().await;
    let a = gateway(&database, "gw-a", LEASE, 10).await;
    let b = gateway(&database, "gw-b", LEASE, 10).await;
    let ids: Vec<ClientId> = (0..200).map(|n| client(&format!("c-{n}"))).collect();
    let claims = ids.iter().enumerate().flat_map(|(n, id)| {
        let conn = n as u64;
        [
            (id.clone(), "gw-a", a.claim(id, conn, false)),
            (id.clone(), "gw-b", b.claim(id, conn + 1000, false)),
        ]
    });
    let outcomes =
        join_all(claims.map(|(id, gateway, claim)| async move {
            (id, gateway, claim.await.expect("no outage"))
        }))
        .await;
    for id in &ids {
        let mine: Vec<&(ClientId, &str, Claim)> =
            outcomes.iter().filter(|(of, ..)| of == id).collect();
        let claimed: Vec<&str> = mine
            .iter()
            .filter(|(_, _, claim)| matches!(claim, Claim::Claimed { .. }))
            .map(|(_, gateway, _)| *gateway)
            .collect();
        assert_eq!(claimed.len(), 1, "{id}: {mine:?}");
        let holder = a.holder(id).await.expect("no outage").expect("held");
        assert_eq!(holder.as_str(), claimed[0], "{id}");
    }
    assert_eq!(
        scalar(&database, "SELECT COUNT(*) FROM sessions").await,
        200
    );
}

#[tokio::test]
async fn only_the_holding_connection_gives_a_client_id_back() {
    let database = database().await;
    let a = gateway(&database, "gw-a", LEASE, 10).await;
    let b = gateway(&database, "gw-b", LEASE, 10).await;
    let id = client("kept");
    a.claim(&id, 1, false).await.expect("no outage");
    b.release(&id, 1).await;
    a.release(&id, 2).await;
    assert_eq!(
        a.holder(&id).await.expect("no outage"),
        Some(GatewayId::new("gw-a")),
        "another gateway or connection gives nothing back"
    );
    a.release(&id, 1).await;
    assert_eq!(a.holder(&id).await.expect("no outage"), None);
}

#[tokio::test]
async fn a_dead_gateways_block_and_ids_are_free_once_its_lease_ends() {
    let database = database().await;
    let lease = Duration::from_secs(1);
    let max = 5;
    let a = gateway(&database, "gw-a", lease, max).await;
    let b = gateway(&database, "gw-b", LEASE, max).await;
    for conn in 0..5 {
        take(&a, conn, max).await;
    }
    assert_eq!(
        rows_of(&database, "gw-a").await,
        5,
        "the whole cluster, A's"
    );
    a.claim(&client("held"), 0, false).await.expect("no outage");
    assert_eq!(try_take(&b, 1, max).await, None, "full");
    // Killed: no renewal, no leaving, its lease connection closed.
    drop(a);
    // The database's clock decides when A's lease has ended: wait for the first slot B gets.
    let deadline = tokio::time::Instant::now() + lease + Duration::from_secs(10);
    while try_take(&b, 1, max).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's slots never came free"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for conn in 2..=5 {
        assert!(
            try_take(&b, conn, max).await.is_some(),
            "slot {conn} free again after A's lease"
        );
    }
    assert_eq!(
        b.claim(&client("held"), 9, false).await.expect("no outage"),
        Claim::Claimed { replaced: None }
    );
}

#[tokio::test]
async fn a_gateway_restarted_under_its_id_gives_back_what_its_last_run_left() {
    let database = database().await;
    let max = 100;
    let first = gateway(&database, "gw-a", LEASE, max).await;
    take(&first, 1, max).await;
    first
        .claim(&client("left-behind"), 1, false)
        .await
        .expect("no outage");
    drop(first);
    let again = gateway(&database, "gw-a", LEASE, max).await;
    assert_eq!(rows_of(&database, "gw-a").await, 0);
    assert_eq!(
        again
            .holder(&client("left-behind"))
            .await
            .expect("no outage"),
        None
    );
    // And its new block works as the first one did.
    assert!(try_take(&again, 1, max).await.is_some());
}

/// Counts asked at once share reads, but never one that began before they were asked: each
/// answer below must see the claim made before it was asked for.
#[tokio::test]
async fn counts_asked_together_are_never_older_than_the_question() {
    let database = database().await;
    let a = gateway(&database, "gw-a", LEASE, 100).await;
    let clients = |counts: Option<super::ClusterCounts>| counts.expect("a cluster").clients;
    for n in 1..=3u64 {
        take(&a, n, 100).await;
        a.claim(&client(&format!("c{n}")), n, false)
            .await
            .expect("claimed");
        let asked = join_all((0..8).map(|_| a.counts())).await;
        for counts in asked {
            assert_eq!(clients(counts.expect("no outage")), n);
        }
    }
}
