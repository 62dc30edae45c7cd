"""Who the client is: proxy users from an LDAP / Active Directory server and Kerberos tickets.

Local users (argon2id hashes in the policy) stay in `safesquid_tw.policy.credentials`; this
package adds the directory (`ldapdir`), the remembered directory verdicts (`verdicts`), the
SPNEGO acceptor (`negotiate`) and the object a policy version uses to combine them
(`authenticator`).
"""
