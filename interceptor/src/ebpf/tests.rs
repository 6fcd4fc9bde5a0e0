use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use interceptor_ebpf::{AF_INET, AF_INET6, MAPS, PROGRAMS};

use super::{maps::*, *};

#[test]
fn address_words_round_trip_in_network_byte_order() {
    let ip = Ipv4Addr::new(169, 254, 169, 254);
    assert_eq!(ipv4_to_word(ip).to_ne_bytes(), [169, 254, 169, 254]);
    assert_eq!(word_to_ipv4(ipv4_to_word(ip)), ip);
    assert_eq!(words_to_ipv6(ipv6_to_words(METADATA_IPV6)), METADATA_IPV6);
    assert_eq!(
        ipv6_to_words(METADATA_IPV6)[0].to_ne_bytes(),
        [0xfd, 0x00, 0x0e, 0xc2]
    );
}

#[test]
fn kernel_config_encodes_ports_in_network_order_and_flags() {
    let redirect = Redirect {
        metadata4: SocketAddrV4::new(METADATA_IPV4, 80),
        metadata6: METADATA_IPV6,
        proxy4: Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 8181)),
        proxy6: None,
    };
    let config = kernel_config(&redirect, (42, 4026531840), 7);
    assert_eq!(config.metadata_port.to_ne_bytes(), [0, 80]);
    assert_eq!(config.proxy_port4.to_ne_bytes(), 8181u16.to_be_bytes());
    assert_eq!(config.flags, FLAG_PROXY4);
    assert_eq!(
        (config.cgroup_id, config.netns_id, config.object_hash),
        (42, 4026531840, 7)
    );
    assert_eq!(config.abi_version, ABI_VERSION);
}

#[test]
fn conn_keys_match_what_the_kernel_records() {
    let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
    let local: SocketAddr = "10.0.0.1:8181".parse().unwrap();
    let key = conn_key(peer, local).unwrap();
    assert_eq!(key.family, AF_INET);
    assert_eq!((key.client_port, key.proxy_port), (40000, 8181));
    assert_eq!(
        key.client_addr,
        [ipv4_to_word(Ipv4Addr::new(10, 1, 2, 3)), 0, 0, 0]
    );
    // A dual-stack listener sees IPv4 peers as mapped addresses: same key.
    let mapped_peer: SocketAddr = "[::ffff:10.1.2.3]:40000".parse().unwrap();
    let mapped_local: SocketAddr = "[::ffff:10.0.0.1]:8181".parse().unwrap();
    assert_eq!(conn_key(mapped_peer, mapped_local), Some(key));
    let v6 = conn_key(
        "[fd00::2]:1".parse().unwrap(),
        "[fd00::1]:2".parse().unwrap(),
    )
    .unwrap();
    assert_eq!(v6.family, AF_INET6);
    assert_eq!(
        v6.client_addr,
        ipv6_to_words("fd00::2".parse::<Ipv6Addr>().unwrap())
    );
    assert_eq!(conn_key(peer, "[fd00::1]:2".parse().unwrap()), None);
}

/// The kernel crate names its maps and programs with literals; this keeps them equal to
/// the shared constants the loader uses.
#[test]
fn object_defines_every_shared_name() {
    let Ok(object) = object::object() else {
        panic!("no eBPF object embedded: run `cargo xtask build-ebpf` before the tests");
    };
    let parsed = aya_obj::Object::parse(object).expect("the embedded object parses");
    for map in MAPS {
        assert!(parsed.maps.contains_key(map), "object has no map {map}");
    }
    for program in PROGRAMS {
        assert!(
            parsed.programs.contains_key(program),
            "object has no program {program}"
        );
    }
}
