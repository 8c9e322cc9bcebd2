//! Tokens checked one rule at a time: each way a token can be wrong gets its own error, a
//! rotation keeps the previous secret's tokens good, and media proofs hold for their owner only.

use super::*;
use crate::flags::Secret;
use axum::http::HeaderValue;
use chrono::TimeZone;

const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes!!";
const OLD_SECRET: &str = "the-previous-secret-also-32-bytes-long";

fn keys(secrets: &[&str], audience: &str) -> KeyConfig {
    KeyConfig {
        secrets: secrets.iter().map(|s| Secret::new(*s)).collect(),
        secret_files: Vec::new(),
        audience: audience.into(),
    }
}

fn authenticator(secrets: &[&str], audience: &str) -> Authenticator {
    Authenticator::new(
        &keys(secrets, audience),
        Duration::from_secs(30),
        Duration::from_secs(30),
    )
    .expect("valid keys")
    .expect("auth on")
}

fn noon() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0)
        .single()
        .expect("a time")
}

fn alice() -> ClientId {
    ClientId::parse("alice").expect("an id")
}

fn token_for(auth: &Authenticator, client: &ClientId, ttl_s: u64, at: DateTime<Utc>) -> Token {
    Token::new(
        auth.issue(client, Duration::from_secs(ttl_s), at)
            .expect("signed"),
    )
}

#[test]
fn a_token_it_signed_says_who_the_client_is_and_until_when() {
    let auth = authenticator(&[SECRET], "kaiwa");
    let token = token_for(&auth, &alice(), 3600, noon());
    let claims = auth.verify(&token, noon()).expect("valid");
    assert_eq!(claims.client_id, alice());
    assert_eq!(claims.expires_at, noon() + TimeDelta::hours(1));
    assert_eq!(
        claims.valid_until,
        noon() + TimeDelta::hours(1) + TimeDelta::seconds(30)
    );
}

#[test]
fn each_way_a_token_can_be_wrong_has_its_own_error() {
    let auth = authenticator(&[SECRET], "kaiwa");
    let good = token_for(&auth, &alice(), 60, noon());
    let cases: Vec<(&str, Token, ErrorCode)> = vec![
        ("empty", Token::new("  "), ErrorCode::MissingToken),
        ("not a JWT", Token::new("hello"), ErrorCode::MalformedToken),
        (
            "four parts",
            Token::new("a.b.c.d"),
            ErrorCode::MalformedToken,
        ),
        (
            "expired beyond the leeway",
            token_for(&auth, &alice(), 60, noon() - TimeDelta::seconds(91)),
            ErrorCode::ExpiredToken,
        ),
        (
            "another secret",
            token_for(&authenticator(&[OLD_SECRET], "kaiwa"), &alice(), 60, noon()),
            ErrorCode::InvalidTokenSignature,
        ),
        (
            "another audience",
            token_for(&authenticator(&[SECRET], "other"), &alice(), 60, noon()),
            ErrorCode::WrongTokenAudience,
        ),
        (
            "a changed payload",
            Token::new({
                let mut parts: Vec<String> = good.expose().split('.').map(str::to_owned).collect();
                parts[1] =
                    URL_SAFE_NO_PAD.encode(r#"{"sub":"mallory","exp":9999999999,"aud":"kaiwa"}"#);
                parts.join(".")
            }),
            ErrorCode::InvalidTokenSignature,
        ),
    ];
    for (what, token, code) in cases {
        let err = auth.verify(&token, noon()).expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
        assert_eq!(err.close_code().name(), code.as_str(), "{what}");
        assert!(!err.close_code().should_reconnect(), "{what}");
    }
}

/// A token signed by hand: `header` and `claims` as JSON, HMAC-SHA256 with `secret`.
fn hand_signed(header: &str, claims: &str, secret: &str) -> Token {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = mac(secret.as_bytes(), &[message.as_bytes()]).expect("a MAC");
    Token::new(format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

#[test]
fn only_hs256_tokens_with_sub_exp_and_aud_are_taken() {
    let auth = authenticator(&[SECRET], "kaiwa");
    let exp = (noon() + TimeDelta::hours(1)).timestamp();
    let hs256 = r#"{"alg":"HS256","typ":"JWT"}"#;
    let good = format!(r#"{{"sub":"alice","exp":{exp},"aud":"kaiwa"}}"#);
    assert!(
        auth.verify(&hand_signed(hs256, &good, SECRET), noon())
            .is_ok()
    );
    let audience_list = format!(r#"{{"sub":"alice","exp":{exp},"aud":["x","kaiwa"]}}"#);
    assert!(
        auth.verify(&hand_signed(hs256, &audience_list, SECRET), noon())
            .is_ok()
    );
    let malformed = [
        (r#"{"alg":"HS512","typ":"JWT"}"#, good.clone()),
        (r#"{"alg":"none","typ":"JWT"}"#, good.clone()),
        (hs256, r#"{"sub":"alice","aud":"kaiwa"}"#.to_owned()),
        (hs256, format!(r#"{{"exp":{exp},"aud":"kaiwa"}}"#)),
        (hs256, format!(r#"{{"sub":"alice","exp":{exp}}}"#)),
        (
            hs256,
            r#"{"sub":"alice","exp":"soon","aud":"kaiwa"}"#.to_owned(),
        ),
        (
            hs256,
            format!(r#"{{"sub":"a/b","exp":{exp},"aud":"kaiwa"}}"#),
        ),
        (
            hs256,
            format!(r#"{{"sub":"alice","exp":{exp},"aud":"kaiwa","nbf":{exp}}}"#),
        ),
    ];
    for (header, claims) in malformed {
        let err = auth
            .verify(&hand_signed(header, &claims, SECRET), noon())
            .expect_err(&format!("{header} {claims}"));
        assert_eq!(
            err.code(),
            ErrorCode::MalformedToken,
            "{header} {claims}: {err}"
        );
    }
}

#[test]
fn the_leeway_forgives_a_little_clock_difference_and_no_more() {
    let auth = authenticator(&[SECRET], "kaiwa");
    let token = token_for(&auth, &alice(), 60, noon());
    assert!(auth.verify(&token, noon() + TimeDelta::seconds(90)).is_ok());
    assert!(matches!(
        auth.verify(&token, noon() + TimeDelta::seconds(91)),
        Err(AuthError::ExpiredToken(_))
    ));
}

#[test]
fn during_a_rotation_tokens_of_the_previous_secret_stay_good_and_new_ones_use_the_current() {
    let old = authenticator(&[OLD_SECRET], "kaiwa");
    let rotating = authenticator(&[SECRET, OLD_SECRET], "kaiwa");
    let after = authenticator(&[SECRET], "kaiwa");
    let old_token = token_for(&old, &alice(), 60, noon());
    assert!(rotating.verify(&old_token, noon()).is_ok());
    assert!(matches!(
        after.verify(&old_token, noon()),
        Err(AuthError::InvalidSignature)
    ));
    let new_token = token_for(&rotating, &alice(), 60, noon());
    assert!(
        after.verify(&new_token, noon()).is_ok(),
        "signed with the current secret"
    );
}

#[test]
fn a_token_for_one_client_does_not_open_another() {
    let auth = authenticator(&[SECRET], "kaiwa");
    let token = token_for(&auth, &alice(), 60, noon());
    assert!(auth.verify_for(&token, " alice ", noon()).is_ok());
    let err = auth.verify_for(&token, "bob", noon()).expect_err("bob");
    assert_eq!(err.code(), ErrorCode::ClientIdMismatch);
    assert!(err.to_string().contains("alice") && err.to_string().contains("bob"));
}

#[test]
fn a_media_proof_holds_for_its_owner_and_path_under_either_secret() {
    let old = authenticator(&[OLD_SECRET], "kaiwa");
    let rotating = authenticator(&[SECRET, OLD_SECRET], "kaiwa");
    let path = "media/images/0123abcd.png";
    let proof = old.sign_media(&alice(), path);
    assert!(rotating.owns_media(&alice(), path, &proof));
    let bob = ClientId::parse("bob").expect("an id");
    assert!(!rotating.owns_media(&bob, path, &proof));
    assert!(!rotating.owns_media(&alice(), "media/images/other.png", &proof));
    assert!(!rotating.owns_media(&alice(), path, "not-base64!"));
    assert!(!rotating.owns_media(&alice(), path, ""));
    assert!(rotating.owns_media(&alice(), path, &rotating.sign_media(&alice(), path)));
}

#[test]
fn tokens_come_from_a_bearer_header_or_the_query_of_an_upgrade() {
    let mut headers = HeaderMap::new();
    assert_eq!(bearer(&headers).expect("no header"), None);
    headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer a.b.c"));
    assert_eq!(
        bearer(&headers).expect("a bearer token"),
        Some(Token::new("a.b.c"))
    );
    headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  x.y.z "));
    assert_eq!(
        bearer(&headers).expect("any case"),
        Some(Token::new("x.y.z"))
    );
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwdw=="),
    );
    assert_eq!(
        bearer(&headers).expect_err("basic").code(),
        ErrorCode::MalformedToken
    );
    headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer"));
    assert_eq!(
        bearer(&headers).expect_err("empty").code(),
        ErrorCode::MissingToken
    );

    let empty = HeaderMap::new();
    assert_eq!(
        upgrade_token(&empty, Some("x=1&token=a.b%2Ec")).expect("from the query"),
        Some(Token::new("a.b.c"))
    );
    assert_eq!(upgrade_token(&empty, Some("token=")).expect("empty"), None);
    assert_eq!(upgrade_token(&empty, None).expect("none"), None);
    let mut both = HeaderMap::new();
    both.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Bearer from.the.header"),
    );
    assert_eq!(
        upgrade_token(&both, Some("token=from.the.query")).expect("the header first"),
        Some(Token::new("from.the.header"))
    );
    // A proxy's Basic login is not kaiwa's: the upgrade goes on without it.
    let mut basic = HeaderMap::new();
    basic.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwdw=="),
    );
    assert_eq!(upgrade_token(&basic, None).expect("left alone"), None);
    assert_eq!(
        upgrade_token(&basic, Some("token=a.b.c")).expect("the query still counts"),
        Some(Token::new("a.b.c"))
    );
}

#[test]
fn the_admin_token_opens_only_with_the_exact_token() {
    let config = |token: Option<&str>| {
        let mut config = crate::config::ServeConfig::from_args(Vec::<String>::new())
            .expect("defaults")
            .auth;
        config.admin_token = token.map(Secret::new);
        config
    };
    let access = AdminAccess::from_config(&config(Some("an-admin-token-of-enough-bytes")), true);
    assert!(access.admits(&Token::new("an-admin-token-of-enough-bytes")));
    assert!(!access.admits(&Token::new("an-admin-token-of-enough-byte")));
    assert!(!access.admits(&Token::new("")));
    assert!(matches!(
        AdminAccess::from_config(&config(None), false),
        AdminAccess::Open
    ));
    assert!(matches!(
        AdminAccess::from_config(&config(None), true),
        AdminAccess::Closed
    ));
}

#[test]
fn secrets_and_tokens_never_show_in_debug_output() {
    let auth = authenticator(&[SECRET, OLD_SECRET], "kaiwa");
    let shown = format!("{auth:?}");
    assert!(
        !shown.contains(SECRET) && !shown.contains(OLD_SECRET),
        "{shown}"
    );
    let token = token_for(&auth, &alice(), 60, noon());
    assert!(!format!("{token:?}").contains(token.expose()));
    let config = crate::config::ServeConfig::from_args([
        "--auth-secret",
        SECRET,
        "--admin-token",
        "an-admin-token-of-enough-bytes",
    ])
    .expect("valid");
    let shown = format!("{config:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(!shown.contains("an-admin-token-of-enough-bytes"), "{shown}");
}

#[test]
fn bad_auth_flags_stop_the_server_with_a_message_naming_the_flag_and_not_the_value() {
    let short = "too-short-a-secret";
    let err = crate::config::ServeConfig::from_args(["--auth-secret", short])
        .expect_err("a short secret");
    let text = err.to_string();
    assert!(
        text.contains("--auth-secret") && !text.contains(short),
        "{text}"
    );

    let err = crate::config::ServeConfig::from_args([
        "--auth-secret",
        SECRET,
        "--auth-secret",
        OLD_SECRET,
        "--auth-secret",
        "a-third-secret-that-is-long-enough-too",
    ])
    .expect_err("three secrets");
    assert!(err.to_string().contains("at most two"), "{err}");

    let err = crate::config::ServeConfig::from_args(["--admin-token", "short"])
        .expect_err("a short admin token");
    assert!(err.to_string().contains("--admin-token"), "{err}");

    let err = crate::config::ServeConfig::from_args(["--cors-origin", "example.com"])
        .expect_err("not an origin");
    assert!(err.to_string().contains("--cors-origin"), "{err}");
}

#[test]
fn a_secret_file_holds_the_current_secret_then_the_previous_one() {
    let dir = tempfile::tempdir().expect("a directory");
    let path = dir.path().join("secrets");
    std::fs::write(&path, format!("{SECRET}\n{OLD_SECRET}\n")).expect("written");
    let config = KeyConfig {
        secrets: Vec::new(),
        secret_files: vec![path.clone()],
        audience: "kaiwa".into(),
    };
    let secrets = config.secrets().expect("read");
    assert_eq!(
        secrets.iter().map(Secret::expose).collect::<Vec<_>>(),
        [SECRET, OLD_SECRET]
    );
    let both = KeyConfig {
        secrets: vec![Secret::new(SECRET)],
        ..config
    };
    assert!(matches!(both.secrets(), Err(AuthError::SecretTwice)));
    let missing = KeyConfig {
        secrets: Vec::new(),
        secret_files: vec![dir.path().join("nope")],
        audience: "kaiwa".into(),
    };
    assert!(matches!(
        missing.secrets(),
        Err(AuthError::SecretFile { .. })
    ));
}

#[test]
fn without_auth_a_public_address_needs_allow_anonymous() {
    let err = crate::config::ServeConfig::from_args(["--bind", "0.0.0.0:8082"])
        .expect_err("anonymous on every interface");
    let text = err.to_string();
    assert!(
        text.contains("--auth-secret") && text.contains("--allow-anonymous"),
        "{text}"
    );
    assert!(
        crate::config::ServeConfig::from_args(["--bind", "0.0.0.0:8082", "--allow-anonymous"])
            .is_ok()
    );
    assert!(
        crate::config::ServeConfig::from_args(["--bind", "0.0.0.0:8082", "--auth-secret", SECRET])
            .is_ok()
    );
    assert!(crate::config::ServeConfig::from_args(["--bind", "[::1]:8082"]).is_ok());
}
