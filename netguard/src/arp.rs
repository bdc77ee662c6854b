//! Who holds the virtual IP? An ARP probe (as in duplicate address
//! detection: sender address 0.0.0.0) for the address, sent from this host;
//! any other host that holds it answers, and a standby that just took it
//! announces it with gratuitous ARP, which counts as well.
//!
//! Done on a packet socket rather than with `arping`: the supervisor's
//! recorder reaps every child process of the supervisor (`waitpid(-1)`), so
//! a helper's exit status would be lost.

use crate::{os, NetError};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const ETH_P_ARP: u16 = 0x0806;

fn ifindex_and_mac(fd: &OwnedFd, dev: &str) -> Result<(i32, [u8; 6]), NetError> {
    if dev.len() >= libc::IFNAMSIZ {
        return Err(NetError::Invalid(format!(
            "interface name {dev} is too long"
        )));
    }
    // SAFETY: a zeroed ifreq is valid; the name is copied in below.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFINDEX reads the name and writes the index into ifr.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr) } != 0 {
        return Err(NetError::Invalid(format!(
            "no interface {dev} here: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: the kernel filled the index member of the union.
    let index = unsafe { ifr.ifr_ifru.ifru_ifindex };
    // SAFETY: SIOCGIFHWADDR reads the name and writes the address into ifr.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) } != 0 {
        return Err(os("SIOCGIFHWADDR"));
    }
    // SAFETY: the kernel filled the hwaddr member of the union.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok((index, mac))
}

/// Probe for `ip` on `dev` until `window` has passed; true as soon as a
/// host other than this one answers or announces it.
pub fn held_elsewhere(dev: &str, ip: Ipv4Addr, window: Duration) -> Result<bool, NetError> {
    // SAFETY: plain socket(2) call; the result is checked and owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            ETH_P_ARP.to_be() as i32,
        )
    };
    if fd < 0 {
        return Err(os("packet socket"));
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (index, mac) = ifindex_and_mac(&fd, dev)?;
    // SAFETY: a zeroed sockaddr_ll is valid; fields are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = index;
    // SAFETY: sll is a valid sockaddr_ll of the size passed.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    } != 0
    {
        return Err(os("bind packet socket"));
    }
    let mut to = sll;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let mut probe = Vec::with_capacity(28);
    probe.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    probe.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    probe.extend_from_slice(&[6, 4]);
    probe.extend_from_slice(&1u16.to_be_bytes()); // request
    probe.extend_from_slice(&mac);
    probe.extend_from_slice(&[0; 4]); // sender 0.0.0.0: a probe
    probe.extend_from_slice(&[0; 6]);
    probe.extend_from_slice(&ip.octets());
    let end = Instant::now() + window;
    let mut next_probe = Instant::now();
    let mut buf = [0u8; 128];
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(false);
        }
        if now >= next_probe {
            // SAFETY: probe and `to` are live, of the sizes passed.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    probe.as_ptr() as *const libc::c_void,
                    probe.len(),
                    0,
                    &to as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            next_probe = now + Duration::from_millis(100);
        }
        let wait = next_probe
            .min(end)
            .saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, wait.as_millis().max(1) as i32) } <= 0 {
            continue;
        }
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 28 {
            continue;
        }
        let a = &buf[..n as usize];
        let sender_mac = &a[8..14];
        let sender_ip = &a[14..18];
        if sender_ip == ip.octets() && sender_mac != mac {
            return Ok(true);
        }
    }
}
