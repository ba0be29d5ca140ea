//! The scheduler's decisions, one pending set at a time.

use super::wait::tests::cooling;
use super::*;
use crate::record::Outcome;
use crate::task::parse_task;

fn pending(s: &mut Scheduler, yaml: &str, id: &str) {
    let task = parse_task(yaml, id, "t.yaml").expect("valid task");
    let seq = s.next_seq();
    s.insert(Pending {
        task,
        path: PathBuf::from(format!("{id}.yaml")),
        hash: 0,
        sig: (0, 0, 0),
        seq,
        enqueued: Instant::now(),
        history: History::default(),
        not_before: None,
        note: None,
    });
}

fn order(s: &mut Scheduler, now: Instant) -> Vec<String> {
    let o = s.take_order(&cfg(), now);
    let ids = o
        .iter()
        .filter(|e| s.is_current(e))
        .map(|e| e.2.clone())
        .collect();
    s.put_order(o);
    ids
}

fn cfg() -> Config {
    Config::parse(
        "agents:\n  a: {kind: command, command: sh, max_instances: 1}\n  b: {kind: command, command: sh}\nrouting:\n  fallback: [a, b]\n  rules: [{type: docs, agent: b}]\n",
        "c.yaml",
    )
    .expect("valid config")
}

#[test]
fn priority_then_fifo() {
    let mut s = Scheduler::new();
    pending(&mut s, "description: x\npriority: low\n", "l1");
    pending(&mut s, "description: x\n", "n1");
    pending(&mut s, "description: x\npriority: high\n", "h1");
    pending(&mut s, "description: x\n", "n2");
    assert_eq!(order(&mut s, Instant::now()), vec!["h1", "n1", "n2", "l1"]);
    // Kept in order as tasks arrive and leave, without a full sort.
    pending(&mut s, "description: x\npriority: high\n", "h2");
    s.remove("n1");
    assert_eq!(order(&mut s, Instant::now()), vec!["h1", "h2", "n2", "l1"]);
}

#[test]
fn aging_promotes_low() {
    let mut s = Scheduler::new();
    pending(&mut s, "description: x\npriority: low\n", "l1");
    pending(&mut s, "description: x\n", "n1");
    let later = Instant::now() + Duration::from_secs(31 * 60);
    s.pending.get_mut("n1").expect("n1").enqueued = later;
    // l1 has waited 31 minutes (aging 30): it now ranks with normal and arrived first.
    assert_eq!(order(&mut s, later), vec!["l1", "n1"]);
}

#[test]
fn finds_cycles_and_only_cycles() {
    let mut s = Scheduler::new();
    pending(&mut s, "description: x\ndependencies: [b]\n", "a");
    pending(&mut s, "description: x\ndependencies: [c]\n", "b");
    pending(&mut s, "description: x\ndependencies: [a]\n", "c");
    pending(&mut s, "description: x\ndependencies: [a]\n", "d");
    let c = s.cycles();
    assert_eq!(c.keys().cloned().collect::<Vec<_>>(), vec!["a", "b", "c"]);
    assert!(c["a"].contains("a → b → c → a"), "{}", c["a"]);
}

#[test]
fn routing_prefers_task_then_rule_then_fallback() {
    let cfg = cfg();
    let per = HashMap::new();
    let mut unavailable = HashMap::new();
    let cap = Capacity {
        running_total: 0,
        running_per_agent: &per,
        unavailable: &unavailable,
    };
    let t = parse_task("description: x\nagent: b\n", "t", "t").expect("task");
    assert!(
        matches!(choose_agent(&cfg, &t, &cap, None, None), Decision::Run { agent, .. } if agent == "b")
    );
    let t = parse_task("description: x\ntype: docs\n", "t", "t").expect("task");
    assert!(
        matches!(choose_agent(&cfg, &t, &cap, None, None), Decision::Run { agent, .. } if agent == "b")
    );
    let t = parse_task("description: x\n", "t", "t").expect("task");
    assert!(
        matches!(choose_agent(&cfg, &t, &cap, None, None), Decision::Run { agent, .. } if agent == "a")
    );
    unavailable.insert(
        "a".to_string(),
        Unavailable::Missing("a missing".to_string()),
    );
    let cap = Capacity {
        running_total: 0,
        running_per_agent: &per,
        unavailable: &unavailable,
    };
    match choose_agent(&cfg, &t, &cap, None, None) {
        Decision::Run { agent, because } => {
            assert_eq!(agent, "b");
            assert!(because.contains("a missing"));
        }
        other => panic!("{other:?}"),
    }
    let t = parse_task("description: x\nagent: zz\n", "t", "t").expect("task");
    assert!(matches!(
        choose_agent(&cfg, &t, &cap, None, None),
        Decision::Fail(_)
    ));
}

#[test]
fn busy_agent_waits_instead_of_spilling() {
    let cfg = cfg();
    let per = HashMap::from([("a".to_string(), 1usize)]);
    let unavailable = HashMap::new();
    let cap = Capacity {
        running_total: 1,
        running_per_agent: &per,
        unavailable: &unavailable,
    };
    let t = parse_task("description: x\n", "t", "t").expect("task");
    assert!(
        matches!(choose_agent(&cfg, &t, &cap, None, None), Decision::Wait(w) if w.to_string().contains("free a"))
    );
}

#[test]
fn a_task_no_agent_can_run_says_so_even_when_every_slot_is_busy() {
    let cfg = Config::parse(
        "orchestrator: {max_concurrent: 1}\nagents:\n  a: {kind: command, command: sh}\n  b: {kind: command, command: sh}\nrouting:\n  fallback: [a]\n",
        "c.yaml",
    )
    .expect("config");
    let per = HashMap::from([("b".to_string(), 1usize)]);
    let unavailable = HashMap::from([(
        "a".to_string(),
        Unavailable::Missing("agent a: `nope` not found on PATH".into()),
    )]);
    let cap = Capacity {
        running_total: 1,
        running_per_agent: &per,
        unavailable: &unavailable,
    };
    let t = parse_task("description: x\n", "t", "t").expect("task");
    match choose_agent(&cfg, &t, &cap, None, None) {
        Decision::Wait(w) => assert_eq!(
            w.to_string(),
            "no agent available: agent a: `nope` not found on PATH"
        ),
        other => panic!("{other:?}"),
    }
    // One that could run when a slot frees up waits for the slot.
    let t = parse_task("description: x\nagent: b\n", "t", "t").expect("task");
    assert!(matches!(
        choose_agent(&cfg, &t, &cap, None, None),
        Decision::Wait(WaitReason::AtCapacity { slots: 1 })
    ));
}

#[test]
fn failed_agent_goes_to_the_back_of_the_chain() {
    let cfg = cfg();
    let per = HashMap::new();
    let unavailable = HashMap::new();
    let cap = Capacity {
        running_total: 0,
        running_per_agent: &per,
        unavailable: &unavailable,
    };
    let t = parse_task("description: x\n", "t", "t").expect("task");
    match choose_agent(&cfg, &t, &cap, Some("a"), None) {
        Decision::Run { agent, because } => {
            assert_eq!(agent, "b");
            assert!(because.contains("handed over from a"), "{because}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn decisions_carry_typed_wait_reasons() {
    let cfg = cfg();
    let per = HashMap::new();
    let unavailable = HashMap::from([
        ("a".to_string(), cooling(Outcome::RateLimited)),
        ("b".to_string(), Unavailable::Missing("b missing".into())),
    ]);
    let cap = Capacity {
        running_total: 0,
        running_per_agent: &per,
        unavailable: &unavailable,
    };
    let mut s = Scheduler::new();
    pending(&mut s, "description: x\ndependencies: [d1, d2]\n", "t");
    let now = Instant::now();
    let states = |d: &str| {
        if d == "d1" {
            DepState::Completed
        } else {
            DepState::Running
        }
    };
    let p = s.get("t").expect("pending");
    assert_eq!(
        decide(&cfg, p, now, &cap, &states, None),
        Decision::Wait(WaitReason::Dependencies(vec![(
            "d2".into(),
            DepState::Running
        )]))
    );
    pending(&mut s, "description: x\n", "u");
    let p = s.get("u").expect("pending");
    match decide(&cfg, p, now, &cap, &states, None) {
        Decision::Wait(w @ WaitReason::AgentUnavailable(_)) => assert!(w.waits_for_cooldown()),
        other => panic!("{other:?}"),
    }
    let mut p = p.clone();
    p.not_before = Some(now + Duration::from_secs(60));
    assert_eq!(
        decide(&cfg, &p, now, &cap, &states, None),
        Decision::Wait(WaitReason::NotBefore {
            until: None,
            why: None
        })
    );
}

#[test]
fn notes_change_only_when_the_reason_does() {
    let mut s = Scheduler::new();
    pending(&mut s, "description: x\n", "t");
    let busy = WaitReason::AtCapacity { slots: 1 };
    assert_eq!(s.set_note("t", busy.clone()), Some(&busy));
    assert_eq!(s.set_note("t", busy.clone()), None);
    assert!(s.set_note("t", WaitReason::NoAgent).is_some());
    assert!(s.set_note("gone", WaitReason::NoAgent).is_none());
    assert!(!s.waits_for_cooldown());
    let rested = WaitReason::AgentUnavailable(vec![cooling(Outcome::RateLimited)]);
    assert!(s.set_note("t", rested).is_some());
    assert!(s.waits_for_cooldown());
}

#[test]
fn backing_off_looks_at_every_pending_task() {
    let mut s = Scheduler::new();
    pending(&mut s, "description: x\n", "t");
    let now = Instant::now();
    assert!(!s.backing_off(now));
    s.pending.get_mut("t").expect("t").not_before = Some(now + Duration::from_secs(5));
    assert!(s.backing_off(now));
    assert!(!s.backing_off(now + Duration::from_secs(6)));
}

#[test]
fn backoff_doubles() {
    let cfg = cfg();
    assert_eq!(retry_delay(&cfg, 1), Duration::from_secs(60));
    assert_eq!(retry_delay(&cfg, 3), Duration::from_secs(240));
}

/// A fan-out parent waits for its candidates; `first_pass` picks at the first completion, `all` and
/// `judge` only once every candidate finished, and `judge` asks its judge first when more than one
/// candidate completed.
#[test]
fn a_fan_out_is_decided_by_its_candidates() {
    let decide_with = |yaml: &str, states: &[(&str, DepState)]| {
        let mut s = Scheduler::new();
        pending(&mut s, yaml, "f");
        let p = s.get("f").expect("pending").clone();
        let states: HashMap<String, DepState> =
            states.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let dep = |id: &str| states.get(id).copied().unwrap_or(DepState::Missing);
        let unavailable = HashMap::new();
        let running = HashMap::new();
        let cap = Capacity {
            running_total: 0,
            running_per_agent: &running,
            unavailable: &unavailable,
        };
        decide(&cfg(), &p, Instant::now(), &cap, &dep, None)
    };
    use DepState::*;
    let first = "description: x\nfan_out: [a, b]\n";
    assert_eq!(
        decide_with(first, &[("f.a", Running), ("f.b", Pending)]),
        Decision::Wait(WaitReason::Dependencies(vec![
            ("f.a".into(), Running),
            ("f.b".into(), Pending)
        ]))
    );
    assert_eq!(
        decide_with(first, &[("f.a", Running), ("f.b", Completed)]),
        Decision::Pick
    );
    assert!(matches!(
        decide_with(first, &[("f.a", Failed), ("f.b", Failed)]),
        Decision::Fail(e) if e.contains("no candidate completed")
    ));
    let all = "description: x\nfan_out: 2\npick: all\n";
    assert!(matches!(
        decide_with(all, &[("f.1", Completed), ("f.2", Running)]),
        Decision::Wait(_)
    ));
    assert_eq!(
        decide_with(all, &[("f.1", Completed), ("f.2", Failed)]),
        Decision::Pick
    );
    let judged = "description: x\nfan_out: [a, b]\npick: judge\njudge: b\n";
    let both = [("f.a", Completed), ("f.b", Completed)];
    assert_eq!(decide_with(judged, &both), Decision::Judge);
    let mut asked = both.to_vec();
    asked.push(("f.judge", Running));
    assert!(matches!(decide_with(judged, &asked), Decision::Wait(_)));
    asked[2].1 = Failed;
    assert_eq!(decide_with(judged, &asked), Decision::Pick);
    // One completed: no judge is needed.
    assert_eq!(
        decide_with(judged, &[("f.a", Completed), ("f.b", Failed)]),
        Decision::Pick
    );
    assert!(matches!(
        decide_with("description: x\nfan_out: [a, zz]\n", &[]),
        Decision::Fail(e) if e.contains("agent `zz` is not configured")
    ));
}

/// A candidate pinned to its agent never falls back to another; with `fan_out_skip_cooling` it
/// is dropped while its agent cannot run.
#[test]
fn a_candidate_stays_on_its_agent() {
    let task = |yaml: &str| parse_task(yaml, "f.a", "t.yaml").expect("valid");
    let mut unavailable = HashMap::new();
    unavailable.insert("a".to_string(), cooling(Outcome::RateLimited));
    let running = HashMap::new();
    let cap = Capacity {
        running_total: 0,
        running_per_agent: &running,
        unavailable: &unavailable,
    };
    let plain = task("description: x\nagent: a\n");
    assert!(matches!(
        choose_agent(&cfg(), &plain, &cap, None, None),
        Decision::Run { agent, .. } if agent == "b"
    ));
    let candidate = task("description: x\nagent: a\nparent: f\ncandidate: a\n");
    assert!(matches!(
        choose_agent(&cfg(), &candidate, &cap, None, None),
        Decision::Wait(WaitReason::AgentUnavailable(_))
    ));
    let dropped =
        task("description: x\nagent: a\nparent: f\ncandidate: a\nfan_out_skip_cooling: true\n");
    assert!(matches!(
        choose_agent(&cfg(), &dropped, &cap, None, None),
        Decision::Fail(e) if e.contains("candidate dropped (fan_out_skip_cooling)")
    ));
}

/// A router's answer that came with the task (cluster mode: the origin's router) is followed on
/// a host without a router; an agent it named that this host does not have sends the task down
/// the fallback chain, saying so, instead of failing or panicking.
#[test]
fn a_routed_answer_from_elsewhere_is_followed_or_falls_back_saying_why() {
    let cfg = cfg();
    assert!(cfg.routing.router.is_none());
    let (per, unavailable) = (HashMap::new(), HashMap::new());
    let cap = Capacity {
        running_total: 0,
        running_per_agent: &per,
        unavailable: &unavailable,
    };
    let t = parse_task("description: x\n", "t", "t").expect("task");
    let routed = |agent: &str| crate::router::Routed {
        agent: Some(agent.to_string()),
        because: "router r (on host o): category docs".into(),
    };
    match choose_agent(&cfg, &t, &cap, None, Some(&routed("b"))) {
        Decision::Run { agent, because } => {
            assert_eq!(agent, "b");
            assert_eq!(because, "router r (on host o): category docs");
        }
        other => panic!("{other:?}"),
    }
    match choose_agent(&cfg, &t, &cap, None, Some(&routed("zz"))) {
        Decision::Run { agent, because } => {
            assert_eq!(agent, "a", "the fallback chain");
            assert!(
                because.ends_with("`zz` is not configured here"),
                "{because}"
            );
        }
        other => panic!("{other:?}"),
    }
}
