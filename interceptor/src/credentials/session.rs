/// The STS session name for a pod: `<namespace>.<pod>`, so CloudTrail shows which pod used
/// a role. Characters STS does not accept (`[\w+=,.@-]` only) become `-`. A name that had
/// to be changed or cut to STS's 64 characters ends in a hash of the original, so two pods
/// never share a session name by sanitising or truncation. STS also wants at least two
/// characters: a shorter name (only from empty names) gets the hash suffix as well.
pub fn session_name(namespace: &str, pod: &str) -> String {
    const MIN: usize = 2;
    const MAX: usize = 64;
    let full = format!("{namespace}.{pod}");
    let clean: String = full
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean == full && (MIN..=MAX).contains(&clean.len()) {
        return clean;
    }
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let suffix = format!("-{:08x}", hash as u32);
    let keep = (MAX - suffix.len()).min(clean.len());
    format!("{}{suffix}", &clean[..keep])
}
