# Moves a finished upload into place, but only if its SHA-256 matches what was sent;
# a mismatching partial file is removed so it can never be mistaken for the real one.
param(
    [Parameter(Mandatory = $true)][string]$Partial,
    [Parameter(Mandatory = $true)][string]$Path,
    [Parameter(Mandatory = $true)][string]$Sha256
)
$ErrorActionPreference = 'Stop'
$actual = (Get-FileHash -LiteralPath $Partial -Algorithm SHA256).Hash
if ($actual -ne $Sha256) {
    Remove-Item -LiteralPath $Partial -Force
    throw "checksum mismatch for ${Path}: got $actual"
}
Move-Item -LiteralPath $Partial -Destination $Path -Force
